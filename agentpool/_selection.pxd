# Declarations of the selection part of the core (included by _core.pxd).
