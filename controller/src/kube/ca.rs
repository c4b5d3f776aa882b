//! The controller's TLS material in a cluster.
//!
//! From the directory `--tls-dir` (a mounted Secret: `ca.crt`, `ca.key`, `tls.crt`,
//! `tls.key`), whatever is there is used:
//!
//! | files present | CA | serving certificate | bootstrap |
//! |---|---|---|---|
//! | `ca.crt`, `ca.key`, `tls.crt`, `tls.key` | from the files | from the files | yes |
//! | `ca.crt`, `ca.key` | from the files | issued at start, in memory | yes |
//! | `ca.crt`, `tls.crt`, `tls.key` | certificate only | from the files | no (agents need provisioned certificates) |
//! | none | the Secret [`CaSource::secret`], created if absent | issued at start, in memory | yes |
//!
//! In the last case the first replica to start generates the CA and creates the Secret; a
//! replica that loses that race (`409 AlreadyExists`) reads the winner's Secret, so every
//! replica serves under the same CA and agent certificates survive leader changes. Every
//! replica also writes the CA *certificate* (never the key) to a ConfigMap, which agents
//! mount to trust the controller (as `kube-root-ca.crt` does for the API server).
//!
//! The serving certificate is issued for the DNS names agents dial (the Service's names):
//! every replica has its own key, and a restart issues a new one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use tracing::info;
use weir_transport::{ClusterCa, PkiError, ServerTls, TlsError};

/// Key of the CA certificate in the Secret, the ConfigMap and the TLS directory.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of the CA private key in the Secret and the TLS directory.
pub const CA_KEY_KEY: &str = "ca.key";
const CERT_FILE: &str = "tls.crt";
const KEY_FILE: &str = "tls.key";
/// Subject common name of a generated CA.
pub const GENERATED_CA_NAME: &str = "weir cluster CA";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{what} {namespace}/{name}: {source}")]
    Api {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} has no {key}")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error(
        "{dir} has a serving certificate but no CA certificate ({CA_CERT_KEY}), and no CA Secret is configured"
    )]
    NoCa { dir: PathBuf },
}

/// Where the CA comes from when the TLS directory has none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSource {
    /// `(namespace, name)` of the Secret holding `ca.crt` and `ca.key`; created if absent.
    pub secret: Option<(String, String)>,
    /// `(namespace, name)` of the ConfigMap the CA certificate is published to for agents.
    pub config_map: Option<(String, String)>,
}

/// The controller's TLS: what it serves with, and the CA that signs node certificates (None
/// if only the CA certificate is available: no bootstrap then).
pub struct ControllerTls {
    pub server: ServerTls,
    pub ca: Option<Arc<ClusterCa>>,
}

impl std::fmt::Debug for ControllerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerTls")
            .field("bootstrap", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads or creates the controller's TLS material (see the module documentation).
/// `dns_names` are the names the serving certificate is issued for, if it is issued here.
pub async fn load_controller_tls(
    client: &Client,
    dir: &Path,
    source: &CaSource,
    dns_names: &[String],
) -> Result<ControllerTls, CaError> {
    let ca_cert = read_opt(&dir.join(CA_CERT_KEY))?;
    let ca_key = read_opt(&dir.join(CA_KEY_KEY))?;
    let cert = read_opt(&dir.join(CERT_FILE))?;
    let key = read_opt(&dir.join(KEY_FILE))?;
    let (ca, ca_pem) = match (ca_cert, ca_key) {
        (Some(c), Some(k)) => {
            info!(dir = %dir.display(), "using the CA from the TLS directory");
            let ca = ClusterCa::from_pem(&c, &k)?;
            (Some(Arc::new(ca)), c)
        }
        (Some(c), None) => {
            info!(dir = %dir.display(), "no CA key: certificate bootstrap is disabled");
            (None, c)
        }
        (None, _) => match &source.secret {
            Some((namespace, name)) => {
                let ca = ca_from_secret(client, namespace, name).await?;
                let pem = ca.cert_pem().to_owned();
                (Some(Arc::new(ca)), pem)
            }
            None => {
                return Err(CaError::NoCa {
                    dir: dir.to_owned(),
                });
            }
        },
    };
    if let (Some(ca), Some((namespace, name))) = (&ca, &source.config_map) {
        publish_ca_certificate(client, namespace, name, ca.cert_pem()).await?;
    }
    let server = match (cert, key, &ca) {
        (Some(cert), Some(key), _) => ServerTls::from_pem(&ca_pem, &cert, &key)?,
        (_, _, Some(ca)) => {
            let names: Vec<&str> = dns_names.iter().map(String::as_str).collect();
            let issued = ca.issue_controller_cert(&names, &[])?;
            info!(names = ?dns_names, "issued the serving certificate");
            ServerTls::from_pem(&ca_pem, &issued.cert_pem, &issued.key_pem)?
        }
        (_, _, None) => {
            return Err(CaError::NoCa {
                dir: dir.to_owned(),
            });
        }
    };
    Ok(ControllerTls { server, ca })
}

/// The CA stored in the Secret, generated and stored first if the Secret does not exist.
pub async fn ca_from_secret(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<ClusterCa, CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |what, source| CaError::Api {
        what,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| api_error("reading Secret", e))?;
    let secret = match existing {
        Some(s) => s,
        None => {
            let ca = ClusterCa::generate(GENERATED_CA_NAME)?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([
                    (
                        CA_CERT_KEY.to_owned(),
                        ByteString(ca.cert_pem().as_bytes().to_vec()),
                    ),
                    (CA_KEY_KEY.to_owned(), ByteString(ca.key_pem().into_bytes())),
                ])),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(%namespace, %name, "generated the cluster CA and stored it");
                    return Ok(ca);
                }
                // Another replica was first: use its CA.
                Err(kube::Error::Api(s)) if s.is_already_exists() => api
                    .get(name)
                    .await
                    .map_err(|e| api_error("reading Secret", e))?,
                Err(e) => return Err(api_error("creating Secret", e)),
            }
        }
    };
    let field = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| CaError::MissingKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
            })
    };
    Ok(ClusterCa::from_pem(
        &field(CA_CERT_KEY)?,
        &field(CA_KEY_KEY)?,
    )?)
}

/// Makes the ConfigMap hold `ca.crt` = `cert_pem` (created or updated).
pub async fn publish_ca_certificate(
    client: &Client,
    namespace: &str,
    name: &str,
    cert_pem: &str,
) -> Result<(), CaError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let api_error = |what, source| CaError::Api {
        what,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    let data = BTreeMap::from([(CA_CERT_KEY.to_owned(), cert_pem.to_owned())]);
    match api
        .get_opt(name)
        .await
        .map_err(|e| api_error("reading ConfigMap", e))?
    {
        Some(cm) if cm.data.as_ref() == Some(&data) => Ok(()),
        Some(mut cm) => {
            cm.data = Some(data);
            api.replace(name, &PostParams::default(), &cm)
                .await
                .map_err(|e| api_error("updating ConfigMap", e))?;
            info!(%namespace, %name, "published the CA certificate");
            Ok(())
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => {
                    info!(%namespace, %name, "published the CA certificate");
                    Ok(())
                }
                // Another replica published the same CA at the same moment.
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
                Err(e) => Err(api_error("creating ConfigMap", e)),
            }
        }
    }
}
