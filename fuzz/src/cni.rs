//! A CNI invocation as a fuzz input: the runtime's environment as `NAME=value` lines up to the
//! first empty line, then the network configuration the plugin reads on stdin:
//!
//! ```text
//! CNI_COMMAND=ADD
//! CNI_CONTAINERID=abc
//! CNI_NETNS=/var/run/netns/x
//! CNI_IFNAME=eth0
//! CNI_ARGS=K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a1;K8S_POD_UID=...
//! CNI_PATH=/opt/cni/bin
//!
//! {"cniVersion": "1.0.0", ...}
//! ```

/// One invocation: the environment and the stdin bytes.
#[derive(Debug, Default)]
pub struct Invocation {
    /// `(name, value)` in input order; a later line for a name wins.
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
}

impl Invocation {
    pub fn parse(input: &[u8]) -> Invocation {
        let (head, stdin) = match input.windows(2).position(|pair| pair == b"\n\n") {
            Some(at) => (&input[..at], &input[at + 2..]),
            None => (input, &[][..]),
        };
        let env = String::from_utf8_lossy(head)
            .lines()
            .filter_map(|line| line.split_once('='))
            // A process environment cannot hold a NUL, so neither can a value here.
            .filter(|(name, value)| !name.contains('\0') && !value.contains('\0'))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Invocation {
            env,
            stdin: stdin.to_vec(),
        }
    }

    /// What `std::env::var` would return for `name` in this environment.
    pub fn var(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.clone())
    }
}
