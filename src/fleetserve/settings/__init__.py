"""Typed settings, one model per process kind; flags, FLEETSERVE_* variables and config files come from them."""
