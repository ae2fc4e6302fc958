"""linewatch: streaming zero-/few-shot visual defect detection for production lines."""

__version__ = "0.1.0"
