"""securechat: a secure, encrypted chat server and client built on Trio."""

__version__ = "0.1.0"
