"""Tests for the survivors of mutation testing of ``ecospa/jobs/export.py`` (issue 24, profile
``export`` of tools/mutation.sh): what a user sees of an export (files written, notes, messages,
the source's tokenizer metadata), on tiny models built here."""
from __future__ import annotations
