//! The xdp backend on a real interface: a veth pair between two network namespaces
//! (scripts/xdp-veth), the checked-in XDP object against its source, and the errors an
//! operator sees without privileges or an interface. These need root (or CAP_NET_ADMIN,
//! CAP_BPF, CAP_NET_RAW, CAP_SYS_ADMIN for namespaces), clang and iproute2: they fail, never
//! skip, where those are missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::{clubcast, require_tool};

fn project(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn checked_in_xdp_object_matches_its_source() {
    require_tool("clang");
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = dir.path().join("relay.o");
    let out = Command::new(project("xdp/build"))
        .arg(&rebuilt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xdp/build failed (apt install clang llvm libbpf-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = std::fs::read(&rebuilt).unwrap();
    let checked_in = std::fs::read(project("xdp/relay.o")).unwrap();
    assert!(
        fresh == checked_in,
        "xdp/relay.o is stale: run xdp/build and commit the object"
    );
}

#[test]
fn relay_on_xdp_over_veth_delivers_everything_and_detaches() {
    require_tool("ip");
    let out = Command::new(project("scripts/xdp-veth"))
        .args(["--bin", env!("CARGO_BIN_EXE_clubcast"), "test"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/xdp-veth test failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "backend xdp: native on",
        "ping and TCP reach the kernel: ok",
        "every piece to every subscriber: ",
        "UDP checksums verified by the receiving kernel: ok",
        "program detached on exit: ok",
        "multi-buffer sends: ",
    ] {
        assert!(stdout.contains(check), "missing {check:?} in\n{stdout}");
    }
    println!("{stdout}");
}

#[test]
fn xdp_without_privileges_or_interface_fails_with_one_clear_line() {
    require_tool("setpriv");
    // Root without capabilities cannot load BPF programs.
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            env!("CARGO_BIN_EXE_clubcast"),
            "relay",
            "--backend",
            "xdp",
            "--interface",
            "lo",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("CAP_BPF") && err.contains("--backend uring"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    for (args, expect) in [
        (
            vec!["--backend", "xdp"],
            "--backend xdp needs --interface IFACE",
        ),
        (
            vec!["--backend", "xdp", "--interface", "nope0"],
            "no network interface named \"nope0\"",
        ),
        (
            vec!["--xdp-mode", "fast"],
            "not an XDP mode (native, generic)",
        ),
    ] {
        let out = clubcast()
            .arg("relay")
            .args(&args)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
