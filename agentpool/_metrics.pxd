# Declarations of the metrics part of the core (included by _core.pxd).
