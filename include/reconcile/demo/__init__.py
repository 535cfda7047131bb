"""Demo business systems (CRM, marketing, ERP as SQLite) with an answer key; see docs/demo.md."""

from .answer_key import QUARANTINE_EXPECTED, SITUATIONS, demo_situations, read_answer_key
from .generator import init_demo

__all__ = ["init_demo", "demo_situations", "read_answer_key", "SITUATIONS", "QUARANTINE_EXPECTED"]
