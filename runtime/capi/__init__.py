"""The C ABI (include/avg_edge.h): a cffi embedding library over the runtime Pipeline."""
