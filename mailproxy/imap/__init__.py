"""
IMAP: the sans-IO framer, the client-facing server and the upstream client.
"""
