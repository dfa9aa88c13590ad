"""Integrations with other frameworks, each behind its optional extra (`idefics2.integrations.ray`: `pip
install 'idefics2[ray]'`); nothing else in the package imports them."""
