//! The services a workload is an endpoint of, each with its port mapping, held as short sorted
//! lists: a workload is an endpoint of one or two services with a port or two each, and nested
//! `BTreeMap`s spent about 680 bytes on that (a B-tree leaf holds room for 11 entries), half of
//! a workload's memory at scale. Read and written as the map the file has
//! (`namespace/hostname: {service port: target port}`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Service key (`namespace/hostname`) -> the workload's ports for it, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePorts(Box<[(Box<str>, PortMap)]>);

/// Service port -> target port on the workload (0: the service's own target port), sorted by
/// service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortMap(Box<[(u16, u16)]>);

impl ServicePorts {
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(key, _)| &**key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &PortMap)> {
        self.0.iter().map(|(key, ports)| (&**key, ports))
    }

    pub fn get(&self, key: &str) -> Option<&PortMap> {
        let at = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PortMap {
    pub fn get(&self, port: u16) -> Option<u16> {
        let at = self.0.binary_search_by_key(&port, |(p, _)| *p).ok()?;
        Some(self.0[at].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.0.iter().copied()
    }
}

/// A key or port given twice keeps the last, as a map's would.
impl<K: Into<Box<str>>> FromIterator<(K, PortMap)> for ServicePorts {
    fn from_iter<I: IntoIterator<Item = (K, PortMap)>>(entries: I) -> ServicePorts {
        let sorted: BTreeMap<Box<str>, PortMap> =
            entries.into_iter().map(|(k, v)| (k.into(), v)).collect();
        ServicePorts(sorted.into_iter().collect())
    }
}

impl FromIterator<(u16, u16)> for PortMap {
    fn from_iter<I: IntoIterator<Item = (u16, u16)>>(ports: I) -> PortMap {
        let sorted: BTreeMap<u16, u16> = ports.into_iter().collect();
        PortMap(sorted.into_iter().collect())
    }
}

impl Serialize for ServicePorts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for ServicePorts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ServicePorts, D::Error> {
        let map = BTreeMap::<String, PortMap>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

impl Serialize for PortMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for PortMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PortMap, D::Error> {
        let map = BTreeMap::<u16, u16>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_the_files_map_and_looks_up_by_key_and_port() {
        let yaml = "b/svc: {90: 9090, 80: 0}\na/svc: {80: 8080}\n";
        let ports: ServicePorts = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(ports.keys().collect::<Vec<_>>(), ["a/svc", "b/svc"]);
        let b = ports.get("b/svc").unwrap();
        assert_eq!(
            (b.get(80), b.get(90), b.get(70)),
            (Some(0), Some(9090), None)
        );
        assert!(!ports.contains_key("c/svc"));
        assert_eq!(
            serde_yaml_ng::to_string(&ports).unwrap(),
            "a/svc:\n  80: 8080\nb/svc:\n  80: 0\n  90: 9090\n"
        );
    }
}
