//! Workload identities (SPIFFE), the built-in CA, and the mutual-TLS configuration of HBONE.
