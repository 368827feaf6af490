"""An impersonation ("log in as customer") gateway speaking four vendors' API dialects."""

__version__ = "0.1.0"
