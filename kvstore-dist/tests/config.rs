//! Parsing the cluster configuration from injected variables and `kvstore.toml` text (the
//! process environment is never touched).

use std::time::Duration;

use kvstore_dist::config::{ConfigError, DistConfig, DistFile, Role, DEFAULT_BIGARRAY_BOUND};

const BASE: [(&str, &str); 4] = [
    ("DMLC_PS_ROOT_URI", "127.0.0.1"),
    ("DMLC_PS_ROOT_PORT", "9091"),
    ("DMLC_NUM_SERVER", "2"),
    ("DMLC_NUM_WORKER", "3"),
];

fn with(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    BASE.iter()
        .chain(extra.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn without(var: &str) -> Vec<(String, String)> {
    with(&[]).into_iter().filter(|(k, _)| k != var).collect()
}

fn err(vars: Vec<(String, String)>) -> String {
    DistConfig::from_vars(vars).unwrap_err().to_string()
}

#[test]
fn defaults_follow_mxnet() {
    let c = DistConfig::from_vars(with(&[])).unwrap();
    assert_eq!(c.role, Role::Worker);
    assert_eq!(c.root_uri, "127.0.0.1");
    assert_eq!(c.root_port, 9091);
    assert_eq!((c.num_servers, c.num_workers), (2, 3));
    assert_eq!(c.node_host, None);
    assert_eq!(c.interface, None);
    assert_eq!(c.port, None);
    assert_eq!(c.verbose, 0);
    assert_eq!(c.heartbeat_interval, Duration::ZERO);
    assert_eq!(c.heartbeat_timeout, Duration::ZERO);
    assert_eq!(c.bigarray_bound, DEFAULT_BIGARRAY_BOUND);
    assert_eq!(c.timeout, Duration::from_secs(600));
    assert!(!c.row_sparse_verbose);
    assert_eq!(c.scheduler_addr(), "127.0.0.1:9091");
    assert_eq!(c.transport().timeout, Duration::from_secs(600));
}

#[test]
fn every_variable_is_read() {
    let c = DistConfig::from_vars(with(&[
        ("DMLC_ROLE", "scheduler"),
        ("DMLC_NODE_HOST", "10.0.0.5"),
        ("DMLC_INTERFACE", "eth0"),
        ("PORT", "9000"),
        ("PS_VERBOSE", "2"),
        ("PS_HEARTBEAT_INTERVAL", "5"),
        ("PS_HEARTBEAT_TIMEOUT", "30"),
        ("MXNET_KVSTORE_BIGARRAY_BOUND", "1000"),
        ("KVSTORE_TIMEOUT_SECS", "0.5"),
        ("KVSTORE_MAX_MESSAGE_BYTES", "1048576"),
        ("MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE", "True"),
    ]))
    .unwrap();
    assert!(c.row_sparse_verbose);
    assert_eq!(c.role, Role::Scheduler);
    assert_eq!(c.node_host.as_deref(), Some("10.0.0.5"));
    assert_eq!(c.interface.as_deref(), Some("eth0"));
    assert_eq!(c.port, Some(9000));
    assert_eq!(c.verbose, 2);
    assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(c.bigarray_bound, 1000);
    assert_eq!(c.timeout, Duration::from_millis(500));
    assert_eq!(c.max_message_bytes, 1 << 20);
    assert_eq!(c.transport().max_message_bytes, 1 << 20);
    for (v, r) in [("worker", Role::Worker), ("server", Role::Server)] {
        assert_eq!(
            DistConfig::from_vars(with(&[("DMLC_ROLE", v)]))
                .unwrap()
                .role,
            r
        );
    }
}

#[test]
fn missing_required_variables_are_named_as_ps_lite_does() {
    for var in [
        "DMLC_PS_ROOT_URI",
        "DMLC_PS_ROOT_PORT",
        "DMLC_NUM_SERVER",
        "DMLC_NUM_WORKER",
    ] {
        let e = DistConfig::from_vars(without(var)).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "Check notnull: Environment::Get()->find(\"{var}\")"
            )),
            "{msg}"
        );
        assert!(msg.contains("kvstore.toml"), "{msg}");
    }
}

#[test]
fn scheduler_hosts_may_be_ipv6_bare_or_bracketed() {
    for (raw, addr) in [
        ("::1", "[::1]:9091"),
        ("[::1]", "[::1]:9091"),
        (" sched-0.example ", "sched-0.example:9091"),
    ] {
        let c = DistConfig::from_vars(with(&[("DMLC_PS_ROOT_URI", raw)])).unwrap();
        assert_eq!(c.scheduler_addr(), addr);
    }
}

#[test]
fn a_heartbeat_timeout_set_alone_gets_an_interval_that_fits_in_it() {
    let c = DistConfig::from_vars(with(&[("PS_HEARTBEAT_TIMEOUT", "2")])).unwrap();
    let (interval, timeout) = kvstore_dist::cluster::heartbeat_settings(&c);
    assert_eq!(timeout, Duration::from_secs(2));
    assert!(interval <= timeout / 3, "{interval:?}");
    // Unset, both follow KVSTORE_TIMEOUT_SECS (600 s: every 5 s, lost after 15 s).
    let c = DistConfig::from_vars(with(&[])).unwrap();
    assert_eq!(
        kvstore_dist::cluster::heartbeat_settings(&c),
        (Duration::from_secs(5), Duration::from_secs(15))
    );
}

#[test]
fn a_heartbeat_timeout_shorter_than_the_interval_is_refused() {
    let msg = err(with(&[
        ("PS_HEARTBEAT_INTERVAL", "10"),
        ("PS_HEARTBEAT_TIMEOUT", "5"),
    ]));
    assert!(
        msg.starts_with("PS_HEARTBEAT_TIMEOUT=\"5\" is invalid"),
        "{msg}"
    );
    assert!(
        msg.contains("at least PS_HEARTBEAT_INTERVAL (10 s)"),
        "{msg}"
    );
}

#[test]
fn bad_values_name_the_variable_and_the_value() {
    let cases = [
        ("DMLC_ROLE", "master", "one of worker, server, scheduler"),
        ("DMLC_PS_ROOT_PORT", "http", "port number"),
        ("DMLC_PS_ROOT_PORT", "0", "port number"),
        ("DMLC_PS_ROOT_PORT", "70000", "port number"),
        ("DMLC_PS_ROOT_URI", " ", "host name"),
        ("DMLC_PS_ROOT_URI", "sched:9091", "without a port"),
        ("DMLC_PS_ROOT_URI", "tcp://sched", "without a port"),
        ("DMLC_PS_ROOT_URI", "[sched]", "without a port"),
        ("PS_HEARTBEAT_INTERVAL", "99999999999", "at most one year"),
        ("DMLC_NUM_SERVER", "0", "at least 1"),
        ("DMLC_NUM_WORKER", "-2", "at least 1"),
        ("PORT", "x", "port number"),
        ("PS_VERBOSE", "3", "0, 1 or 2"),
        ("PS_HEARTBEAT_INTERVAL", "1.5", "whole number of seconds"),
        ("MXNET_KVSTORE_BIGARRAY_BOUND", "0", "at least 1"),
        ("KVSTORE_TIMEOUT_SECS", "0", "positive number of seconds"),
        ("KVSTORE_TIMEOUT_SECS", "NaN", "positive number of seconds"),
        ("KVSTORE_TIMEOUT_SECS", "1e30", "positive number of seconds"),
        ("KVSTORE_MAX_MESSAGE_BYTES", "12", "at least 1024"),
        (
            "MXNET_KVSTORE_DIST_ROW_SPARSE_VERBOSE",
            "yes",
            "0, 1, false or true",
        ),
    ];
    for (var, value, expected) in cases {
        let msg = err(with(&[(var, value)]));
        assert!(
            msg.starts_with(&format!("{var}={value:?} is invalid")),
            "{msg}"
        );
        assert!(msg.contains(expected), "{var}: {msg}");
    }
}

#[test]
fn the_file_fills_in_and_the_environment_wins() {
    let file = DistFile::from_toml_str(
        r#"
        [local]
        ignored = true

        [dist]
        role = "server"
        root_uri = "10.1.1.1"
        root_port = 7000
        num_server = 4
        num_worker = 8
        node_host = "10.1.1.2"
        port = 7001
        verbose = 1
        heartbeat_interval = 2
        bigarray_bound = 500
        timeout_secs = 90
        max_message_bytes = 65536
        "#,
    )
    .unwrap();
    let c = DistConfig::from_vars_and_file(Vec::<(String, String)>::new(), &file).unwrap();
    assert_eq!(c.role, Role::Server);
    assert_eq!(c.scheduler_addr(), "10.1.1.1:7000");
    assert_eq!((c.num_servers, c.num_workers), (4, 8));
    assert_eq!(c.node_host.as_deref(), Some("10.1.1.2"));
    assert_eq!(c.port, Some(7001));
    assert_eq!(c.verbose, 1);
    assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
    assert_eq!(c.bigarray_bound, 500);
    assert_eq!(c.timeout, Duration::from_secs(90));
    assert_eq!(c.max_message_bytes, 65536);

    let c = DistConfig::from_vars_and_file(
        with(&[("DMLC_ROLE", "worker"), ("KVSTORE_TIMEOUT_SECS", "5")]),
        &file,
    )
    .unwrap();
    assert_eq!(c.role, Role::Worker);
    assert_eq!(c.scheduler_addr(), "127.0.0.1:9091");
    assert_eq!((c.num_servers, c.num_workers), (2, 3));
    assert_eq!(c.timeout, Duration::from_secs(5));
    // Not set in the environment: still from the file.
    assert_eq!(c.port, Some(7001));
    assert_eq!(c.bigarray_bound, 500);
}

#[test]
fn bad_files_are_reported_with_the_key() {
    let e = DistFile::from_toml_str("[dist]\nnum_workers = 2\n").unwrap_err();
    assert!(e.to_string().contains("num_workers"), "{e}");
    let e = DistFile::from_toml_str("[dist]\nrole = \"master\"\n").unwrap_err();
    assert!(e.to_string().contains("master"), "{e}");
    let e = DistFile::from_toml_str("[dist\n").unwrap_err();
    assert!(e.to_string().starts_with("invalid kvstore.toml"), "{e}");
    assert_eq!(DistFile::from_toml_str("").unwrap(), DistFile::default());

    let file = DistFile::from_toml_str("[dist]\nnum_server = 0\nnum_worker = 1\n").unwrap();
    let e = DistConfig::from_vars_and_file(without("DMLC_NUM_SERVER"), &file).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("kvstore.toml [dist].num_server=\"0\" is invalid"),
        "{e}"
    );

    let e = DistFile::from_path(std::path::Path::new("/nonexistent/kvstore.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/kvstore.toml"), "{e}");
}

#[test]
fn ipv6_scheduler_addresses_are_bracketed() {
    let c = DistConfig::from_vars(with(&[("DMLC_PS_ROOT_URI", "::1")])).unwrap();
    assert_eq!(c.scheduler_addr(), "[::1]:9091");
}

#[test]
fn config_errors_convert_to_store_errors() {
    let e: kvstore_base::Error = DistConfig::from_vars(without("DMLC_NUM_WORKER"))
        .unwrap_err()
        .into();
    assert!(e.to_string().contains("DMLC_NUM_WORKER"), "{e}");
}

#[test]
fn the_shared_secret_comes_from_one_variable_or_a_file() {
    use kvstore_dist::transport::Secret;
    let dir = std::env::temp_dir().join(format!("kvstore-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    // An editor's line ending is not part of the secret.
    std::fs::write(&file, "0123456789abcdef0123\r\n").unwrap();
    let path = file.to_str().unwrap();
    let expected = Secret::new(b"0123456789abcdef0123".to_vec()).unwrap();

    let c = DistConfig::from_vars(with(&[])).unwrap();
    assert_eq!((c.secret.clone(), c.transport().secret), (None, None));
    let c = DistConfig::from_vars(with(&[("KVSTORE_SECRET_FILE", path)])).unwrap();
    assert_eq!(c.secret.as_ref(), Some(&expected));
    assert_eq!(c.transport().secret, Some(expected.clone()));
    let c = DistConfig::from_vars(with(&[("KVSTORE_SECRET", "0123456789abcdef0123")])).unwrap();
    assert_eq!(c.secret, Some(expected.clone()));
    let toml = format!("[dist]\nsecret_file = {path:?}\n");
    let file_cfg = DistFile::from_toml_str(&toml).unwrap();
    let c = DistConfig::from_vars_and_file(with(&[]), &file_cfg).unwrap();
    assert_eq!(c.secret, Some(expected.clone()));
    // The variable wins over the file's key, as every setting does.
    let c = DistConfig::from_vars_and_file(
        with(&[("KVSTORE_SECRET", "another secret of the job")]),
        &file_cfg,
    )
    .unwrap();
    assert_ne!(c.secret, Some(expected));
    // Never shown, not even in the configuration's Debug.
    assert!(!format!("{c:?}").contains("another secret"), "{c:?}");

    let e = err(with(&[("KVSTORE_SECRET", "short")]));
    assert!(
        e.contains("KVSTORE_SECRET") && e.contains("at least 16 bytes") && !e.contains("short"),
        "{e}"
    );
    let e = err(with(&[
        ("KVSTORE_SECRET", "0123456789abcdef0123"),
        ("KVSTORE_SECRET_FILE", path),
    ]));
    assert!(e.contains("give the secret one way"), "{e}");
    let missing = dir.join("absent");
    let e = err(with(&[("KVSTORE_SECRET_FILE", missing.to_str().unwrap())]));
    assert!(
        e.contains("KVSTORE_SECRET_FILE") && e.contains("absent"),
        "{e}"
    );
    std::fs::write(&file, "tiny\n").unwrap();
    let e = err(with(&[("KVSTORE_SECRET_FILE", path)]));
    assert!(e.contains("has 4"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_stall_warning_defaults_to_a_minute_and_zero_turns_it_off() {
    let c = DistConfig::from_vars(with(&[])).unwrap();
    assert_eq!(c.stall_warning, Duration::from_secs(60));
    let c = DistConfig::from_vars(with(&[("KVSTORE_STALL_WARNING_SECS", "2.5")])).unwrap();
    assert_eq!(c.stall_warning, Duration::from_millis(2500));
    let c = DistConfig::from_vars(with(&[("KVSTORE_STALL_WARNING_SECS", "0")])).unwrap();
    assert_eq!(c.stall_warning, Duration::ZERO);
    let file = DistFile::from_toml_str("[dist]\nstall_warning_secs = 10\n").unwrap();
    let c = DistConfig::from_vars_and_file(with(&[]), &file).unwrap();
    assert_eq!(c.stall_warning, Duration::from_secs(10));
    for bad in ["-1", "soon", "NaN"] {
        let e = err(with(&[("KVSTORE_STALL_WARNING_SECS", bad)]));
        assert!(
            e.contains("KVSTORE_STALL_WARNING_SECS") && e.contains("0: never"),
            "{e}"
        );
    }
    // The timeout itself stays positive.
    let e = err(with(&[("KVSTORE_TIMEOUT_SECS", "0")]));
    assert!(e.contains("a positive number of seconds"), "{e}");
}

#[test]
fn the_bind_host_is_read_from_the_variable_or_the_file() {
    let c = DistConfig::from_vars(with(&[])).unwrap();
    assert_eq!(c.bind_host, None);
    let c = DistConfig::from_vars(with(&[("KVSTORE_BIND_HOST", " 0.0.0.0 ")])).unwrap();
    assert_eq!(c.bind_host.as_deref(), Some("0.0.0.0"));
    let file = DistFile::from_toml_str("[dist]\nbind_host = \"::\"\n").unwrap();
    let c = DistConfig::from_vars_and_file(with(&[]), &file).unwrap();
    assert_eq!(c.bind_host.as_deref(), Some("::"));
}

#[test]
fn a_secret_given_as_a_create_option_replaces_the_environments_either_way() {
    // The only test of this binary that touches the process environment.
    std::env::set_var("KVSTORE_SECRET_FILE", "/nonexistent/job.secret");
    let options: std::collections::BTreeMap<String, String> = [(
        "KVSTORE_SECRET".to_string(),
        "0123456789abcdef0123".to_string(),
    )]
    .into();
    let vars = kvstore_dist::config::request_vars(&options);
    std::env::remove_var("KVSTORE_SECRET_FILE");
    assert_eq!(vars.get("KVSTORE_SECRET_FILE"), None);
    assert_eq!(
        vars.get("KVSTORE_SECRET").map(String::as_str),
        Some("0123456789abcdef0123")
    );
}
