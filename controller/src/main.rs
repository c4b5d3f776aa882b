//! `weir-controller`: compiles the cluster's NetworkPolicies into per-node state and streams
//! it to the node agents over mutual TLS.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tracing::info;
use weir_controller::run::run_directory;
use weir_transport::{NodeStateServer, ServerTls, StatePublisher, TlsFiles};

#[derive(Parser, Debug)]
#[command(version, about = "weir controller")]
struct Args {
    /// Read cluster objects from this directory of manifests (watched for changes) instead
    /// of the Kubernetes API.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Directory with ca.crt, tls.crt and tls.key (the controller's serving certificate).
    #[arg(long, env = "WEIR_TLS_DIR", default_value = "/etc/weir/tls")]
    tls_dir: PathBuf,
    /// With --manifests: write the enforced sync token here (see the manifest source docs).
    #[arg(long)]
    status_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let publisher = StatePublisher::new();
    let tls = ServerTls::load(&TlsFiles::in_dir(&args.tls_dir))
        .with_context(|| format!("loading TLS files from {}", args.tls_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    info!(listen = %args.listen, "serving agents");
    let server = NodeStateServer::new(publisher.clone());
    tokio::spawn(async move {
        if let Err(e) = server.serve(listener, tls, std::future::pending()).await {
            tracing::error!(error = %e, "agent server stopped");
        }
    });
    match args.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), "reading cluster objects from manifests");
            run_directory(dir, publisher, args.status_file).await
        }
        None => bail!("reading from the Kubernetes API is not available yet: pass --manifests DIR"),
    }
}
