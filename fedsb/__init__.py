"""fedsb: federated fine-tuning with Fed-SB."""
__version__ = "0.1.0"
