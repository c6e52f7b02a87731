//! Packet captures on a node's underlay link (tcpdump from Debian), and reading them back: what
//! crossed between the nodes, as the tests need to see it.

use crate::error::{LabError, Result};
use crate::topology::{UNDERLAY_IFNAME, node_spec};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// Bytes kept of each packet: headers plus the start of the payload.
const SNAPLEN: &str = "512";
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// tcpdump running on a node's underlay; `finish` stops it and returns the packets.
pub struct UnderlayCapture {
    child: Child,
    file: PathBuf,
}

/// One captured TCP segment (IPv4).
#[derive(Clone, Debug)]
pub struct Segment {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    /// The captured part of the payload (up to the snap length).
    pub payload: Vec<u8>,
}

impl UnderlayCapture {
    /// Starts capturing TCP on `node`'s underlay into `file`, and waits until tcpdump listens.
    pub fn start(node: &str, file: &Path) -> Result<UnderlayCapture> {
        let node = node_spec(node)?;
        let file_arg = file.display().to_string();
        let argv = [
            "tcpdump",
            "-i",
            UNDERLAY_IFNAME,
            "-n",
            "-U",
            "-s",
            SNAPLEN,
            "-w",
            &file_arg,
            "tcp",
        ];
        let mut child = crate::exec_node(node.name, &argv)?
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("starting tcpdump for", file, e))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.contains("listening on") {
                    let _ = ready_tx.send(());
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Command {
                command: argv.join(" "),
                detail: "did not start listening".into(),
            });
        }
        Ok(UnderlayCapture {
            child,
            file: file.to_owned(),
        })
    }

    /// Stops tcpdump (SIGINT, so it flushes) and parses the capture.
    pub fn finish(mut self) -> Result<Vec<Segment>> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        let bytes =
            std::fs::read(&self.file).map_err(|e| LabError::io("reading", &self.file, e))?;
        parse_pcap(&bytes).ok_or_else(|| LabError::Command {
            command: format!("reading capture {}", self.file.display()),
            detail: "not a pcap file of Ethernet frames".into(),
        })
    }
}

impl Drop for UnderlayCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds what `lab-tool` puts on the wire in captured payloads: any 16 bytes in a row of the
/// first `stream_bytes` of the pseudo-random stream its clients send (so a leak shows wherever
/// it happened in a connection, not only at its start), or the JSON report its server sends
/// back. A captured segment holds only its first bytes, so looking for one marker at the start
/// of the stream would miss whatever crossed later in a connection.
pub struct PlaintextFinder {
    /// The stream as 8-byte words, in order.
    words: Vec<u64>,
    /// Word -> its first index in `words`.
    index: HashMap<u64, usize>,
    /// One bit per value of a word's low `FILTER_BITS` bits: most windows of a payload are
    /// passed over without hashing.
    filter: Vec<u64>,
}

const FILTER_BITS: u32 = 20;
/// What every `lab-tool serve` report holds (`ServerReport` as serde_json writes it).
const REPORT_MARKER: &[u8] = b"\"sha256\":\"";

impl PlaintextFinder {
    pub fn new(stream_bytes: usize) -> PlaintextFinder {
        let mut stream = vec![0u8; stream_bytes.div_ceil(8).max(2) * 8];
        crate::traffic::PseudoRandom::default().fill(&mut stream);
        let words: Vec<u64> = stream
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
            .collect();
        let mut index = HashMap::with_capacity(words.len());
        let mut filter = vec![0u64; 1 << (FILTER_BITS - 6)];
        for (at, &word) in words.iter().enumerate() {
            index.entry(word).or_insert(at);
            let bit = filter_bit(word);
            filter[bit / 64] |= 1 << (bit % 64);
        }
        PlaintextFinder {
            words,
            index,
            filter,
        }
    }

    /// Whether `payload` holds two consecutive words of the stream (at any byte offset) or a
    /// server's report.
    pub fn carries_plaintext(&self, payload: &[u8]) -> bool {
        self.stream_offset(payload).is_some()
            || payload
                .windows(REPORT_MARKER.len())
                .any(|window| window == REPORT_MARKER)
    }

    /// Where in the stream the first piece of it found in `payload` begins, in bytes.
    pub fn stream_offset(&self, payload: &[u8]) -> Option<usize> {
        let word_at = |at: usize| {
            payload
                .get(at..at + 8)
                .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        };
        for at in 0..payload.len().saturating_sub(15) {
            let word = word_at(at)?;
            let bit = filter_bit(word);
            if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
                continue;
            }
            let Some(&position) = self.index.get(&word) else {
                continue;
            };
            if self.words.get(position + 1).copied() == word_at(at + 8) {
                return Some(position * 8);
            }
        }
        None
    }
}

fn filter_bit(word: u64) -> usize {
    (word & ((1 << FILTER_BITS) - 1)) as usize
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads a classic little-endian pcap of Ethernet frames; keeps the IPv4 TCP segments.
pub fn parse_pcap(bytes: &[u8]) -> Option<Vec<Segment>> {
    const GLOBAL_HEADER: usize = 24;
    const RECORD_HEADER: usize = 16;
    const LINKTYPE_ETHERNET: u32 = 1;
    if bytes.get(..4)? != [0xd4, 0xc3, 0xb2, 0xa1]
        || u32::from_le_bytes(bytes.get(20..24)?.try_into().ok()?) != LINKTYPE_ETHERNET
    {
        return None;
    }
    let mut segments = Vec::new();
    let mut at = GLOBAL_HEADER;
    while at + RECORD_HEADER <= bytes.len() {
        let captured = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().ok()?) as usize;
        let frame = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + captured)?;
        at += RECORD_HEADER + captured;
        if let Some(segment) = tcp_segment(frame) {
            segments.push(segment);
        }
    }
    Some(segments)
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    if u16_be(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(14..)?;
    let ip_header = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != IPPROTO_TCP {
        return None;
    }
    let total = usize::from(u16_be(ip, 2)?);
    let address = |at: usize| {
        Some(Ipv4Addr::new(
            *ip.get(at)?,
            *ip.get(at + 1)?,
            *ip.get(at + 2)?,
            *ip.get(at + 3)?,
        ))
    };
    let tcp = ip.get(ip_header..)?;
    let tcp_header = usize::from(tcp.get(12)? >> 4) * 4;
    let payload_end = total.saturating_sub(ip_header).min(tcp.len());
    Some(Segment {
        source: SocketAddrV4::new(address(12)?, u16_be(tcp, 0)?),
        destination: SocketAddrV4::new(address(16)?, u16_be(tcp, 2)?),
        payload: tcp
            .get(tcp_header..payload_end)
            .unwrap_or_default()
            .to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_piece_of_the_stream_and_the_servers_report() {
        let finder = PlaintextFinder::new(64 * 1024);
        let mut stream = vec![0u8; 64 * 1024];
        crate::traffic::PseudoRandom::default().fill(&mut stream);
        // 16 bytes from the middle of the stream, not on a word boundary, inside other bytes.
        let mut payload = vec![0x5a; 100];
        payload.extend_from_slice(&stream[40_003..40_026]);
        payload.extend([0xa5; 50]);
        assert_eq!(finder.stream_offset(&payload), Some(40_008));
        assert!(finder.carries_plaintext(&payload));
        // Fewer bytes than hold two whole words, or bytes past what it indexed: not found.
        assert!(!finder.carries_plaintext(&stream[40_003..40_018]));
        let mut longer = vec![0u8; 128 * 1024];
        crate::traffic::PseudoRandom::default().fill(&mut longer);
        assert!(!finder.carries_plaintext(&longer[100_000..100_400]));
        // Bytes that are not the stream.
        let other: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(!finder.carries_plaintext(&other));
        let report =
            br#"{"peer":"10.244.1.2:40000","local":"10.244.2.2:8080","bytes":4096,"sha256":"ab"}"#;
        assert!(finder.carries_plaintext(report));
    }

    #[test]
    fn parses_a_tcp_segment_from_a_pcap() {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        pcap.extend([0u8; 8]);
        pcap.extend(512u32.to_le_bytes());
        pcap.extend(1u32.to_le_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]);
        let payload = b"\x16\x03\x01hello";
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2,
        ];
        let total = (20 + 20 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        frame.extend(ip);
        frame.extend(tcp);
        frame.extend(payload);
        pcap.extend([0u8; 8]);
        pcap.extend((frame.len() as u32).to_le_bytes());
        pcap.extend((frame.len() as u32).to_le_bytes());
        pcap.extend(&frame);
        let segments = parse_pcap(&pcap).unwrap();
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].source, "10.244.1.2:40000".parse().unwrap());
        assert_eq!(segments[0].destination, "10.244.2.2:15008".parse().unwrap());
        assert_eq!(segments[0].payload, payload);
    }
}
