//! The in-process servers the scenario runs on: plain HTTP/1.1 ones for the upstream and
//! the hop, and the idem gateway itself.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::{DemoError, io_error};
use crate::config::{FileConfig, GatewayConfig, Overrides};
use crate::gateway::Gateway;

/// An HTTP/1.1 server on `127.0.0.1:0`; dropping it stops it and its connections.
pub(super) struct Server {
    pub(super) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub(super) async fn start<H, F, E>(handler: H) -> Result<Self, DemoError>
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("listen on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("read a listener's address"))?;
        let task = tokio::spawn(async move {
            // Dropped with the task when the server stops: that aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                while connections.try_join_next().is_some() {}
                let _ = stream.set_nodelay(true);
                let service = hyper::service::service_fn(handler.clone());
                connections.spawn(async move {
                    // Errors here are mostly the hop's lost answers: closed on purpose.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The idem gateway on `127.0.0.1:0`, with the default durable store (fjall) in a temporary
/// directory.
pub(super) struct GatewayRun {
    pub(super) addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: JoinHandle<()>,
    /// Removed when the run ends, after the gateway (and its store) are gone.
    dir: tempfile::TempDir,
}

impl GatewayRun {
    pub(super) async fn start(upstream: SocketAddr) -> Result<Self, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix("idem-demo-")
            .tempdir()
            .map_err(io_error("create a temporary directory for the store"))?;
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".to_owned()),
            upstream: Some(format!("http://{upstream}")),
            store: Some(format!("fjall:{}", dir.path().join("idem.fjall").display())),
            ..Overrides::default()
        };
        let config = GatewayConfig::resolve(FileConfig::default(), &overrides)?;
        let store = config.store.open().await?;
        let gateway = Gateway::new(&config, store);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io_error("listen on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("read the gateway's address"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(crate::gateway::serve_on(
            listener,
            gateway,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(10),
        ));
        Ok(Self {
            addr,
            stop,
            serving,
            dir,
        })
    }

    /// Stops the gateway once detached work has stored its answers, then removes the store.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.serving.await;
        // The store closed with the gateway (its writer thread joined); now the file can go.
        let dir = self.dir;
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
    }
}
