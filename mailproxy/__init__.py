"""
mailproxy: an IMAP and POP3 access proxy for Twisted.
"""

# The one place the version is written: setup.py reads it from here.
__version__ = "0.1.0"
