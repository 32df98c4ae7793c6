# cdef declarations of the compiled core; one file per concept.
include "_framing.pxd"
include "_selection.pxd"
include "_metrics.pxd"
include "_codec.pxd"
include "_protocol.pxd"
