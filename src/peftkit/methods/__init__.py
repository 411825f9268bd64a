"""One file per method; each registers itself with :func:`peftkit.core.registry.register` on import."""
