//! Mutual TLS for HBONE connections, with the configurations of `identity::tls` and the
//! certificates of the node's certificate store.

use crate::host::tcp::TcpTransport;
use crate::identity::tls::{client_config, peer_identity, server_config};
use crate::identity::{CertificateStore, Identity};
use rustls::pki_types::ServerName;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// The node's certificates, and the roots they and the peers' chain to, both from the store.
pub(crate) struct Mtls {
    pub store: Arc<CertificateStore>,
}

impl Mtls {
    /// The client handshake as `local`, accepting only a server presenting one of `expected`.
    /// Waits for `local`'s certificate first (the handshake only reads what the store holds).
    pub(crate) async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        local: &Identity,
        expected: &[Identity],
        io: IO,
    ) -> io::Result<client::TlsStream<IO>> {
        self.store
            .certificate(local)
            .await
            .map_err(io::Error::other)?;
        let config = client_config(
            self.store.clone(),
            local.clone(),
            self.store.roots(),
            expected.to_vec(),
        );
        // SNI is disabled in the config and the peer is checked by its SPIFFE identity: the
        // name is only a placeholder rustls requires.
        let name = ServerName::IpAddress(IpAddr::from(Ipv4Addr::UNSPECIFIED).into());
        TlsConnector::from(config).connect(name, io).await
    }

    /// The server handshake as `local` with its `acceptor`, once `local`'s certificate is
    /// held (the handshake only reads what the store holds, and a pod's first connections may
    /// come before the fetch its enrollment started is done); returns the stream and the
    /// client's identity.
    pub(crate) async fn accept(
        &self,
        acceptor: &TlsAcceptor,
        local: &Identity,
        tcp: TcpStream,
    ) -> io::Result<(server::TlsStream<TcpTransport>, Identity)> {
        self.store
            .certificate(local)
            .await
            .map_err(io::Error::other)?;
        let tls = acceptor.accept(TcpTransport::new(tcp)).await?;
        let identity = peer_identity(tls.get_ref().1).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "client presented no SPIFFE identity",
            )
        })?;
        Ok((tls, identity))
    }

    /// The server side as `local`: built once per pod (the certificate and the roots are the
    /// store's at each handshake, so rotation needs no new acceptor): use it through `accept`.
    pub(crate) fn acceptor(&self, local: &Identity) -> TlsAcceptor {
        TlsAcceptor::from(server_config(self.store.clone(), local.clone()))
    }
}
