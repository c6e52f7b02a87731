//! What crossed the underlay during the soak: only HBONE between the mesh's pods on the two
//! nodes, none of the test's bytes outside TLS, and the positive controls (u1, outside the
//! mesh, to a2 on the other node, in plaintext) seen in clear, which shows the capture and
//! the search would have caught a leak.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use ztunnel_lab::capture::{PlaintextFinder, Segment};

const HBONE_PORT: u16 = 15008;
/// How many offending segments the verdict describes.
const EXAMPLES: usize = 5;

/// The pods whose traffic between the nodes must be HBONE.
pub struct Meshed {
    pub node1: Vec<Ipv4Addr>,
    pub node2: Vec<Ipv4Addr>,
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub segments: usize,
    pub hbone_segments: usize,
    pub hbone_payload_bytes: usize,
    /// Distinct TCP connections to port 15008 seen.
    pub hbone_connections: usize,
    /// For each control connection: its segments, and whether the search found its bytes.
    pub controls: Vec<(SocketAddrV4, usize, bool)>,
    /// Segments neither HBONE between meshed pods nor a control's.
    pub unexpected: usize,
    /// Segments outside the controls that carry the test's bytes in clear.
    pub leaks: usize,
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.unexpected == 0
            && self.leaks == 0
            && self.hbone_segments > 0
            && !self.controls.is_empty()
            && self.controls.iter().all(|&(_, _, seen)| seen)
    }

    pub fn judge(
        segments: &[Segment],
        meshed: &Meshed,
        controls: &[SocketAddrV4],
        finder: &PlaintextFinder,
    ) -> Verdict {
        let mut verdict = Verdict {
            segments: segments.len(),
            controls: controls.iter().map(|&c| (c, 0, false)).collect(),
            ..Verdict::default()
        };
        let mut hbone_clients = BTreeSet::new();
        let between_nodes = |a: &Ipv4Addr, b: &Ipv4Addr| {
            (meshed.node1.contains(a) && meshed.node2.contains(b))
                || (meshed.node2.contains(a) && meshed.node1.contains(b))
        };
        for segment in segments {
            let (from, to) = (segment.source, segment.destination);
            if let Some(control) = verdict
                .controls
                .iter_mut()
                .find(|(client, _, _)| *client == from || *client == to)
            {
                control.1 += 1;
                if from == control.0 && finder.carries_plaintext(&segment.payload) {
                    control.2 = true;
                }
                continue;
            }
            let hbone = (from.port() == HBONE_PORT || to.port() == HBONE_PORT)
                && between_nodes(from.ip(), to.ip());
            if hbone {
                verdict.hbone_segments += 1;
                verdict.hbone_payload_bytes += segment.payload.len();
                hbone_clients.insert(if to.port() == HBONE_PORT { from } else { to });
            } else {
                verdict.unexpected += 1;
                if verdict.examples.len() < EXAMPLES {
                    verdict.examples.push(format!(
                        "not HBONE between meshed pods: {from} -> {to}, {} payload bytes",
                        segment.payload.len()
                    ));
                }
            }
            if finder.carries_plaintext(&segment.payload) {
                verdict.leaks += 1;
                if verdict.examples.len() < 2 * EXAMPLES {
                    verdict.examples.push(format!(
                        "the test's bytes in clear: {from} -> {to}, stream offset {:?}, first \
                         bytes {:02x?}",
                        finder.stream_offset(&segment.payload),
                        &segment.payload[..segment.payload.len().min(16)]
                    ));
                }
            }
        }
        verdict.hbone_connections = hbone_clients.len();
        verdict
    }

    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{} TCP segments captured on the underlay: {} HBONE ({} connections to port \
             {HBONE_PORT}, {} payload bytes captured), {} of the positive controls, {} \
             unexpected; {} outside the controls carry the test's bytes in clear",
            self.segments,
            self.hbone_segments,
            self.hbone_connections,
            self.hbone_payload_bytes,
            self.controls.iter().map(|c| c.1).sum::<usize>(),
            self.unexpected,
            self.leaks
        )];
        for (client, segments, seen) in &self.controls {
            lines.push(format!(
                "    positive control from {client}: {segments} segments, its bytes {}",
                if *seen {
                    "seen in clear"
                } else {
                    "NOT seen: the capture or the search is blind"
                }
            ));
        }
        for example in &self.examples {
            lines.push(format!("    ! {example}"));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(from: &str, to: &str, payload: Vec<u8>) -> Segment {
        Segment {
            source: from.parse().unwrap(),
            destination: to.parse().unwrap(),
            payload,
        }
    }

    #[test]
    fn only_hbone_and_the_controls_may_cross_and_only_the_controls_in_clear() {
        let finder = PlaintextFinder::new(4096);
        let mut clear = vec![0u8; 4096];
        ztunnel_lab::traffic::PseudoRandom::default().fill(&mut clear);
        let sealed = vec![0x17u8; 300];
        let meshed = Meshed {
            node1: vec!["10.244.1.2".parse().unwrap()],
            node2: vec!["10.244.2.2".parse().unwrap()],
        };
        let control: SocketAddrV4 = "10.244.2.3:40000".parse().unwrap();
        let mut segments = vec![
            segment("10.244.1.2:50000", "10.244.2.2:15008", sealed.clone()),
            segment("10.244.2.2:15008", "10.244.1.2:50000", sealed.clone()),
            segment("10.244.2.3:40000", "10.244.1.3:8080", clear[..400].to_vec()),
            segment("10.244.1.3:8080", "10.244.2.3:40000", Vec::new()),
        ];
        let verdict = Verdict::judge(&segments, &meshed, &[control], &finder);
        assert!(verdict.passed(), "{:?}", verdict.lines());
        assert_eq!((verdict.hbone_segments, verdict.hbone_connections), (2, 1));
        assert_eq!(verdict.controls, [(control, 2, true)]);

        // A mesh pod's bytes outside HBONE, and HBONE carrying them in clear.
        segments.push(segment("10.244.1.2:50001", "10.244.2.2:8080", sealed));
        segments.push(segment(
            "10.244.1.2:50000",
            "10.244.2.2:15008",
            clear[1000..1100].to_vec(),
        ));
        let verdict = Verdict::judge(&segments, &meshed, &[control], &finder);
        assert_eq!((verdict.unexpected, verdict.leaks), (1, 1));
        assert!(!verdict.passed());

        // A control whose bytes the search does not find fails the run too.
        let blind = Verdict::judge(&segments[..2], &meshed, &[control], &finder);
        assert!(!blind.passed());
    }
}
