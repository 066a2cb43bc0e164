"""Single source of the package version (read by setup.py and ``verl.__version__``)."""
__version__ = "0.1.0.dev0"
