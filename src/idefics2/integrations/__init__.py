"""Integrations with other systems, each an optional extra (`idefics2.integrations.ray`: `pip install
'idefics2[ray]'`)."""
