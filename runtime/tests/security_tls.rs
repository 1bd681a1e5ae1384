//! TLS on the native protocol with certificates made here (rcgen): a TLS session reads correct
//! pages; a plaintext client to a TLS server, a client trusting another CA, a wrong server name
//! and a TLS client to a plaintext server are refused with clear errors; mutual TLS refuses a
//! client without a certificate from the configured CA; unix sockets stay plaintext. Needs no
//! root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use distriproc_config::pageserver::{PageServerClientConfig, PageServerConfig};
use distriproc_pageserver::{Server, ServerHandle, ServerOptions};
use distriproc_runtime::error_chain;
use distriproc_runtime::images::testutil::*;
use distriproc_runtime::images::PE_PRESENT;
use distriproc_runtime::protocol::tls::TlsClient;
use distriproc_runtime::remote::{Endpoint, RemoteOptions, RemotePages};
use distriproc_runtime::source::{PageKind, PageSource};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const BASE: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 16;

fn page(p: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| u8::try_from((p * 7 + i * 13) % 251).unwrap())
        .collect()
}

fn make_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    write_inventory(dir).unwrap();
    write_pstree(dir, &[1]).unwrap();
    write_pagemap(dir, 1, 1, &[pm(BASE, PAGES, PE_PRESENT)]).unwrap();
    let data: Vec<u8> = (0..PAGES).flat_map(page).collect();
    std::fs::write(dir.join("pages-1.img"), data).unwrap();
}

/// A CA (certificate PEM file, and the pieces to sign with).
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key)?;
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, cert.pem())?;
    Ok(Ca { cert, key, pem })
}

/// A leaf certificate for `names` signed by `ca`: (cert file, key file).
fn leaf(dir: &Path, ca: &Ca, file: &str, names: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate()?;
    let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    let (c, k) = (
        dir.join(format!("{file}.crt")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

struct Setup {
    _d: tempfile::TempDir,
    dir: PathBuf,
    ca: Ca,
    other_ca: Ca,
    server: (PathBuf, PathBuf),
}

fn setup() -> Result<Setup> {
    let d = tempfile::tempdir()?;
    let dir = d.path().to_path_buf();
    make_checkpoint(&dir.join("store/ck"));
    let ca = ca(&dir, "test-ca")?;
    let other_ca = ca_other(&dir)?;
    let server = leaf(&dir, &ca, "server", &["localhost", "127.0.0.1"])?;
    Ok(Setup {
        _d: d,
        dir,
        ca,
        other_ca,
        server,
    })
}

fn ca_other(dir: &Path) -> Result<Ca> {
    ca(dir, "other-ca")
}

/// A page server from a TOML configuration (as the binary reads it), TLS on TCP, a unix
/// listener too.
fn start(s: &Setup, extra: &str) -> Result<ServerHandle> {
    let toml = format!(
        "store = {:?}\nlisten = [\"127.0.0.1:0\", \"unix:{}\"]\naccess_log = false\n\
         tls_cert_file = {:?}\ntls_key_file = {:?}\n{extra}",
        s.dir.join("store").display().to_string(),
        s.dir.join("ps.sock").display(),
        s.server.0.display().to_string(),
        s.server.1.display().to_string(),
    );
    let cfg = PageServerConfig::from_toml_str(&toml, "test.toml")?;
    let mut o = ServerOptions::from_config(&cfg)?;
    o.io_timeout = Duration::from_secs(5);
    ensure!(o.tls.is_some());
    Ok(Server::start(o)?)
}

fn opts(tls: Option<TlsClient>) -> RemoteOptions {
    let mut o = RemoteOptions::new("ck");
    o.io_timeout = Duration::from_secs(5);
    o.connect_timeout = Duration::from_secs(5);
    o.retry_timeout = Duration::from_millis(200);
    o.tls = tls;
    o
}

fn tcp(h: &ServerHandle) -> Endpoint {
    Endpoint::Tcp(h.addrs()[0].clone())
}

fn read_all(rp: &RemotePages) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    for p in 0..PAGES {
        let r = rp.read_pages(1, BASE + p * 4096, &mut buf)?;
        ensure!(r.kind == PageKind::Data && r.pages == 1, "page {p}: {r:?}");
        ensure!(buf == page(p), "page {p} differs");
    }
    Ok(())
}

fn refused(h: &ServerHandle, ep: Endpoint, tls: Option<TlsClient>) -> String {
    let _ = h;
    match RemotePages::connect(ep, opts(tls)) {
        Ok(_) => "connected".into(),
        Err(e) => error_chain(&e),
    }
}

#[test]
fn tls_session_works_and_bad_peers_are_refused() -> Result<()> {
    let s = setup()?;
    let h = start(&s, "")?;

    // A TLS session, configured as the shim's [pageserver] table would configure it: the
    // server name comes from the address (an IP SAN in the certificate).
    let cfg = PageServerClientConfig {
        address: h.addrs()[0].clone(),
        tls_ca_file: s.ca.pem.clone(),
        ..Default::default()
    };
    cfg.validate("test", "pageserver.")?;
    let (ep, mut o) = RemoteOptions::from_config(&cfg, "ck", "tls-test")?.expect("configured");
    o.io_timeout = Duration::from_secs(5);
    let rp = RemotePages::connect(ep, o)?;
    read_all(&rp)?;
    // By DNS name too.
    let rp = RemotePages::connect(
        tcp(&h),
        opts(Some(TlsClient::new(&s.ca.pem, "localhost", None)?)),
    )?;
    read_all(&rp)?;

    // A plaintext client to the TLS server: refused in plaintext, naming TLS.
    let e = refused(&h, tcp(&h), None);
    eprintln!("plaintext client: {e}");
    ensure!(e.contains("requires TLS"), "{e}");
    // A client trusting another CA: the handshake fails on the certificate.
    let e = refused(
        &h,
        tcp(&h),
        Some(TlsClient::new(&s.other_ca.pem, "localhost", None)?),
    );
    ensure!(
        e.contains("tls handshake") && e.contains("invalid peer certificate"),
        "{e}"
    );
    eprintln!("wrong CA: {e}");
    ensure!(e.contains("UnknownIssuer"), "{e}");
    // The right CA, the wrong name.
    let e = refused(
        &h,
        tcp(&h),
        Some(TlsClient::new(&s.ca.pem, "pages.example", None)?),
    );
    ensure!(e.contains("invalid peer certificate"), "{e}");
    // An upload (the shim's remote checkpoint) over TLS, then a read of what was stored.
    let mut up = opts(Some(TlsClient::new(&s.ca.pem, "localhost", None)?));
    up.checkpoint = "ck-up".into();
    let files: Vec<String> = [
        "inventory.img",
        "pstree.img",
        "pagemap-1.img",
        "pages-1.img",
    ]
    .iter()
    .map(|f| f.to_string())
    .collect();
    distriproc_runtime::remote::upload_checkpoint(
        &tcp(&h),
        &up,
        &s.dir.join("store/ck"),
        &files,
        None,
    )?;
    read_all(&RemotePages::connect(tcp(&h), up)?)?;
    // Unix sockets stay plaintext.
    let unix = Endpoint::Unix(s.dir.join("ps.sock"));
    read_all(&RemotePages::connect(unix, opts(None))?)?;
    // The CRIU fetcher mode cannot take a TLS connection.
    let e = distriproc_runtime::remote::open_criu_session(
        &tcp(&h),
        &opts(Some(TlsClient::new(&s.ca.pem, "localhost", None)?)),
    )
    .unwrap_err();
    ensure!(error_chain(&e).contains("TLS"), "{}", error_chain(&e));
    // After all that the server still serves.
    read_all(&RemotePages::connect(
        tcp(&h),
        opts(Some(TlsClient::new(&s.ca.pem, "localhost", None)?)),
    )?)?;
    drop(h);

    // A TLS client to a plaintext server: a clear handshake error, not a hang.
    let mut o = ServerOptions::for_store(s.dir.join("store"));
    o.access_log = false;
    let plain = Server::start(o)?;
    let e = refused(
        &plain,
        tcp(&plain),
        Some(TlsClient::new(&s.ca.pem, "localhost", None)?),
    );
    eprintln!("TLS client, plaintext server: {e}");
    ensure!(
        e.contains("tls handshake") && e.contains("does it speak TLS"),
        "{e}"
    );
    Ok(())
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_ca() -> Result<()> {
    let s = setup()?;
    let client_ca = ca(&s.dir, "client-ca")?;
    let good = leaf(&s.dir, &client_ca, "client", &["shim-1"])?;
    let bad = leaf(&s.dir, &s.other_ca, "intruder", &["shim-1"])?;
    let h = start(
        &s,
        &format!(
            "tls_client_ca_file = {:?}\n",
            client_ca.pem.display().to_string()
        ),
    )?;
    let with = |cert: Option<&(PathBuf, PathBuf)>| -> Result<Option<TlsClient>> {
        Ok(Some(TlsClient::new(
            &s.ca.pem,
            "localhost",
            cert.map(|(c, k)| (c.as_path(), k.as_path())),
        )?))
    };
    read_all(&RemotePages::connect(tcp(&h), opts(with(Some(&good))?))?)?;
    // Also through the client configuration.
    let cfg = PageServerClientConfig {
        address: h.addrs()[0].clone(),
        tls_ca_file: s.ca.pem.clone(),
        tls_server_name: "localhost".into(),
        tls_cert_file: good.0.clone(),
        tls_key_file: good.1.clone(),
        ..Default::default()
    };
    cfg.validate("test", "pageserver.")?;
    let (ep, o) = RemoteOptions::from_config(&cfg, "ck", "mtls")?.expect("configured");
    read_all(&RemotePages::connect(ep, o)?)?;
    // No client certificate, or one from another CA: refused. With TLS 1.3 the client learns
    // of the refusal at its first read, so the error may come with the hello reply.
    for (what, tls) in [("none", with(None)?), ("other CA", with(Some(&bad))?)] {
        let e = refused(&h, tcp(&h), tls);
        eprintln!("mutual TLS, client certificate {what}: {e}");
        ensure!(e != "connected", "{what}: accepted");
        ensure!(
            e.contains("alert") || e.contains("certificate") || e.contains("closed"),
            "{what}: {e}"
        );
    }
    read_all(&RemotePages::connect(tcp(&h), opts(with(Some(&good))?))?)?;
    Ok(())
}

#[test]
fn tls_settings_are_validated_naming_the_key() -> Result<()> {
    let s = setup()?;
    let store = s.dir.join("store").display().to_string();
    for (extra, key) in [
        ("tls_cert_file = \"/x.crt\"\n", "tls_key_file"),
        ("tls_key_file = \"/x.key\"\n", "tls_cert_file"),
        ("tls_client_ca_file = \"/ca.pem\"\n", "tls_client_ca_file"),
    ] {
        let e = PageServerConfig::from_toml_str(&format!("store = {store:?}\n{extra}"), "t.toml")
            .unwrap_err()
            .to_string();
        ensure!(e.contains(key) && e.contains("t.toml"), "{e}");
    }
    // Files that do not hold what they should: named at start.
    let cfg = PageServerConfig::from_toml_str(
        &format!(
            "store = {store:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            s.server.0.display().to_string(),
            s.server.0.display().to_string()
        ),
        "t.toml",
    )?;
    let e = ServerOptions::from_config(&cfg).unwrap_err().to_string();
    ensure!(e.contains("server.crt") && e.contains("private key"), "{e}");
    for bad in [
        PageServerClientConfig {
            address: "h:1".into(),
            tls_server_name: "h".into(),
            ..Default::default()
        },
        PageServerClientConfig {
            address: "h:1".into(),
            tls_ca_file: "/ca.pem".into(),
            tls_cert_file: "/c.crt".into(),
            ..Default::default()
        },
        PageServerClientConfig {
            address: "unix:/run/ps.sock".into(),
            tls_ca_file: "/ca.pem".into(),
            ..Default::default()
        },
    ] {
        let e = bad
            .validate("shim.toml", "pageserver.")
            .unwrap_err()
            .to_string();
        ensure!(e.contains("pageserver.tls_"), "{e}");
    }
    let missing = PageServerClientConfig {
        address: "127.0.0.1:1".into(),
        tls_ca_file: s.dir.join("nope.pem"),
        ..Default::default()
    };
    let e = RemoteOptions::from_config(&missing, "ck", "c")
        .unwrap_err()
        .to_string();
    ensure!(e.contains("nope.pem") && e.contains("tls_ca_file"), "{e}");
    Ok(())
}
