# cdef declarations of the compiled core; one file per concept. Selection and metrics are
# their own extension modules (pure-Python mode), cimported so the core reaches them in C.
from agentpool._selection_c cimport AffinityMap, ConnectionSet, ConnState, SessionMap
from agentpool._metrics_c cimport Histogram, ProtocolMetrics

include "_framing.pxd"
include "_codec.pxd"
include "_protocol.pxd"
