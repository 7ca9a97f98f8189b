"""
mailproxy: an IMAP and POP3 access proxy for Twisted.
"""

__version__ = "0.1.0"
