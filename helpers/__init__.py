"""Consumer-to-shop clothing retrieval: the one package every notebook and the CLI share."""

__version__ = "0.1.0"
