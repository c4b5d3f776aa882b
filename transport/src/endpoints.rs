//! Where the controller is: one fixed address, or addresses found anew before every
//! connection attempt (the agent asks the API server for the controller Service's endpoints
//! when no kube-proxy routes its ClusterIP before weir itself does).

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use crate::{
    TransportError,
    client::{Client, connect},
    tls::ClientTls,
};

type Resolve =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>> + Send + Sync;

/// The controller's endpoints (`https://host:port`).
#[derive(Clone)]
pub enum Endpoints {
    Fixed(String),
    /// Called before every connection attempt; the endpoints are tried in order.
    Resolved {
        /// What is resolved, for logs (e.g. `weir-system/weir-controller`).
        what: String,
        resolve: Arc<Resolve>,
    },
}

impl Endpoints {
    pub fn fixed(endpoint: impl Into<String>) -> Self {
        Self::Fixed(endpoint.into())
    }

    pub fn resolved<F, Fut>(what: impl Into<String>, resolve: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<String>, String>> + Send + 'static,
    {
        Self::Resolved {
            what: what.into(),
            resolve: Arc::new(move || Box::pin(resolve())),
        }
    }

    /// The endpoints to try now, in order: never empty.
    pub async fn current(&self) -> Result<Vec<String>, TransportError> {
        match self {
            Self::Fixed(e) => Ok(vec![e.clone()]),
            Self::Resolved { what, resolve } => match resolve().await {
                Ok(found) if !found.is_empty() => Ok(found),
                Ok(_) => Err(TransportError::Resolve {
                    what: what.clone(),
                    reason: "no ready endpoint".into(),
                }),
                Err(reason) => Err(TransportError::Resolve {
                    what: what.clone(),
                    reason,
                }),
            },
        }
    }

    /// Connects to the first endpoint that answers; the error is the last endpoint's.
    pub async fn connect(&self, tls: &ClientTls) -> Result<(String, Client), TransportError> {
        let mut last = None;
        for endpoint in self.current().await? {
            match connect(&endpoint, tls).await {
                Ok(client) => return Ok((endpoint, client)),
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "controller endpoint unreachable");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("current() is never empty"))
    }
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(e) => f.write_str(e),
            Self::Resolved { what, .. } => write!(f, "the endpoints of {what}"),
        }
    }
}

impl From<String> for Endpoints {
    fn from(endpoint: String) -> Self {
        Self::Fixed(endpoint)
    }
}

impl From<&str> for Endpoints {
    fn from(endpoint: &str) -> Self {
        Self::Fixed(endpoint.to_owned())
    }
}
