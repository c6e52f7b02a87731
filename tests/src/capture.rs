//! Packet captures on a node's underlay link (tcpdump from Debian), and reading them back: what
//! crossed between the nodes, as the tests need to see it.

use crate::error::{LabError, Result};
use crate::topology::{UNDERLAY_IFNAME, node_spec};
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
