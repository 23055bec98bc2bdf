"""Markdown and HTML reports for one run and for `recalign reproduce`."""
