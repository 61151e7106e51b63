"""Integrations of fastmmap with web frameworks and other libraries."""
