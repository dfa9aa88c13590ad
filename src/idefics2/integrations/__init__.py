"""Integrations with other frameworks, each behind its optional extra (imported only where used)."""
