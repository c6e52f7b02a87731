//! What the daemon reports about the connections it proxies: each connection's record and
//! its life (`connections`, also the open authorized connections a policy change re-checks),
//! Istio's labels (`labels`) and TCP metrics (`metrics`), the access log, and the
//! connections refused before they were served (`refusals`).

pub(crate) mod access_log;
pub(crate) mod connections;
pub(crate) mod labels;
pub(crate) mod metrics;
pub(crate) mod refusals;
