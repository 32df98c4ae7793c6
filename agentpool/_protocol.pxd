# Declarations of the protocol part of the core (included by _core.pxd).
