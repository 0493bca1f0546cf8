"""Reporting: result rows, the Table-1 diagnosis and the static site. Reads the store;
never imports the run layer."""
