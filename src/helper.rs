//! The mount(8) calling convention, for `/etc/fstab` and `mount -t fuse.physiofs`:
//!
//! ```text
//! physiofs SOURCE MOUNTPOINT [-o OPT[,OPT...]]           (what fuse3's mount.fuse runs)
//! mount.fuse.physiofs SOURCE MOUNTPOINT [-sfnv] [-o OPTS] (a helper named like that)
//! ```
//!
//! SOURCE is a bucket (`NAME` or `gs://NAME[/PREFIX]`; `physiofs` or `none` mean the default
//! bucket). Each `-o` option `key=value` becomes `--key value` (underscores or dashes),
//! a bare `key` becomes `--key`; generic mount options (`ro`, `rw`, `nodev`, `_netdev`,
//! `x-systemd.*`, ...) are accepted and ignored (the mount is read-only and nosuid/nodev
//! whatever they say). The result is an ordinary `physiofs mount ... --background` command
//! line, so a helper returns once the mount is ready, as mount(8) expects.

use std::ffi::OsString;

/// The long flags of `physiofs mount` as the CLI defines them, each with whether it takes a
/// value: every one is a mount option, so the two cannot drift apart. (`background` is
/// implied, unless `foreground` is given.)
fn mount_flags() -> Vec<(String, bool)> {
    use clap::CommandFactory;
    let cli = crate::cli::Cli::command();
    let mount = cli
        .find_subcommand("mount")
        .expect("the CLI has a mount subcommand");
    mount
        .get_arguments()
        .filter(|a| !a.is_positional())
        .filter_map(|a| Some((a.get_long()?.to_string(), a.get_action().takes_values())))
        .filter(|(name, _)| !matches!(name.as_str(), "background" | "help"))
        .collect()
}

/// Generic mount(8), fstab and systemd options with no meaning for physiofs.
fn ignored(opt: &str) -> bool {
    const WORDS: &[&str] = &[
        "ro",
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "async",
        "sync",
        "dirsync",
        "lazytime",
        "nolazytime",
        "silent",
        "loud",
        "default_permissions",
    ];
    WORDS.contains(&opt)
        || opt.starts_with("x-")
        || opt.starts_with("comment=")
        || opt.starts_with("context=")
        || opt.starts_with("fsname=")
        || opt.starts_with("subtype=")
}

/// Whether `argv` is in mount(8) form rather than `physiofs SUBCOMMAND ...`.
pub fn is_mount_form(argv: &[OsString]) -> bool {
    let prog = argv
        .first()
        .map(|a| std::path::Path::new(a).file_name().unwrap_or(a.as_os_str()))
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if prog.starts_with("mount.") {
        return true;
    }
    match argv.get(1).map(|a| a.to_string_lossy()) {
        Some(a) => {
            !a.starts_with('-')
                && ![
                    "mount", "demo", "testbed", "doctor", "warm", "cache", "help",
                ]
                .contains(&a.as_ref())
        }
        None => false,
    }
}

/// What a mount(8)-form command line asks for.
#[derive(Debug, PartialEq)]
pub enum Helper {
    /// Run `physiofs` with these arguments (`physiofs mount ...`).
    Mount(Vec<OsString>),
    /// `-f` (fake): mount(8) asks for everything but the mount itself.
    Fake,
}

/// Translates a mount(8)-form command line into a `physiofs mount` one. Errors name the
/// offending piece and what is accepted.
pub fn translate(argv: &[OsString]) -> Result<Helper, String> {
    let usage = "usage: physiofs SOURCE MOUNTPOINT [-o OPTIONS] (the mount(8) form; SOURCE is \
                 a bucket NAME or gs://NAME[/PREFIX]), or physiofs mount --help";
    let mut positional = Vec::new();
    let mut opts: Vec<String> = Vec::new();
    let mut fake = false;
    let mut verbose = false;
    let mut it = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.extend(
                it.next()
                    .ok_or_else(|| format!("-o needs options; {usage}"))?
                    .split(',')
                    .map(str::to_string),
            ),
            "-t" | "-N" => {
                it.next();
            }
            "-s" | "-n" => {}
            "-f" => fake = true,
            "-v" => verbose = true,
            o if o.starts_with("-o") && o.len() > 2 => {
                opts.extend(o[2..].split(',').map(str::to_string))
            }
            o if o.starts_with('-') => return Err(format!("unknown flag {o:?}; {usage}")),
            _ => positional.push(a),
        }
    }
    let [source, mountpoint] = <[String; 2]>::try_from(positional)
        .map_err(|p| format!("expected SOURCE and MOUNTPOINT, got {p:?}; {usage}"))?;
    if fake {
        return Ok(Helper::Fake);
    }
    let mut args: Vec<OsString> = vec!["mount".into()];
    if !matches!(source.as_str(), "physiofs" | "none" | "") {
        args.push("--bucket".into());
        args.push(source.into());
    }
    let flags = mount_flags();
    let mut foreground = false;
    for o in opts.iter().filter(|o| !o.is_empty()) {
        if ignored(o) {
            continue;
        }
        let (key, value) = match o.split_once('=') {
            Some((k, v)) => (k.replace('_', "-"), Some(v)),
            None => (o.replace('_', "-"), None),
        };
        let takes_value = flags.iter().find(|(n, _)| *n == key).map(|&(_, v)| v);
        match (value, takes_value) {
            (Some(v), Some(true)) => {
                args.push(format!("--{key}").into());
                args.push(v.into());
            }
            (None, Some(false)) => {
                foreground |= key == "foreground";
                args.push(format!("--{key}").into());
            }
            _ => {
                let list = |values: bool| {
                    flags
                        .iter()
                        .filter(|&&(_, v)| v == values)
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(format!(
                    "unknown mount option {o:?}: physiofs takes {} (KEY=VALUE) and {} \
                     (see physiofs mount --help; underscores or dashes)",
                    list(true),
                    list(false)
                ));
            }
        }
    }
    if verbose {
        args.push("-v".into());
    }
    if !foreground {
        args.push("--background".into());
    }
    args.push(mountpoint.into());
    Ok(Helper::Mount(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    fn mount(h: Helper) -> Vec<String> {
        match h {
            Helper::Mount(a) => a.iter().map(|s| s.to_string_lossy().into_owned()).collect(),
            Helper::Fake => panic!("fake"),
        }
    }

    #[test]
    fn recognises_the_mount_form() {
        assert!(is_mount_form(&v(&[
            "physiofs", "gs://b", "/mnt/x", "-o", "ro"
        ])));
        assert!(is_mount_form(&v(&["/sbin/mount.fuse.physiofs", "b", "/m"])));
        assert!(!is_mount_form(&v(&["physiofs", "mount", "/m"])));
        assert!(!is_mount_form(&v(&["physiofs", "demo"])));
        assert!(!is_mount_form(&v(&["physiofs", "--help"])));
        assert!(!is_mount_form(&v(&["physiofs"])));
    }

    #[test]
    fn options_become_flags() {
        let a = mount(
            translate(&v(&[
                "physiofs",
                "gs://mimic-cxr-jpg-2.1.0.physionet.org/files/p10",
                "/mnt/jpg",
                "-o",
                "ro,nodev,nosuid,_netdev,x-systemd.automount,billing_project=proj,allow_other",
                "-o",
                "cache-size=2GiB,uid=1000",
            ]))
            .unwrap(),
        );
        assert_eq!(
            a,
            [
                "mount",
                "--bucket",
                "gs://mimic-cxr-jpg-2.1.0.physionet.org/files/p10",
                "--billing-project",
                "proj",
                "--allow-other",
                "--cache-size",
                "2GiB",
                "--uid",
                "1000",
                "--background",
                "/mnt/jpg"
            ]
        );
        // `physiofs` as the source means the default bucket; `foreground` stays attached.
        let a = mount(
            translate(&v(&[
                "mount.physiofs",
                "physiofs",
                "/m",
                "-o",
                "foreground",
            ]))
            .unwrap(),
        );
        assert_eq!(a, ["mount", "--foreground", "/m"]);
        assert_eq!(
            translate(&v(&["mount.physiofs", "b", "/m", "-f"])).unwrap(),
            Helper::Fake
        );
    }

    /// The helper only translates: what fstab options mean is decided by the same
    /// resolution as `physiofs mount` flags.
    #[test]
    fn fstab_options_resolve_like_mount_flags() {
        use crate::cli::{Cli, Command};
        use crate::plan::{Env, MountPlan};
        use clap::Parser;
        let Helper::Mount(argv) = translate(&v(&[
            "physiofs",
            "gs://b/files/p10",
            "/mnt/jpg",
            "-o",
            "ro,_netdev,billing_project=proj,cache_size=64MiB,anonymous,uid=7",
        ]))
        .unwrap() else {
            panic!("fake")
        };
        let cli = Cli::try_parse_from(std::iter::once(OsString::from("physiofs")).chain(argv));
        let Command::Mount(args) = cli.unwrap().command else {
            panic!("not a mount")
        };
        assert!(args.background);
        let plan = MountPlan::resolve(&args, &Env::default()).unwrap();
        assert_eq!(plan.mountpoint, std::path::Path::new("/mnt/jpg"));
        assert_eq!(plan.target(), "gs://b/files/p10/");
        assert_eq!(plan.gcs.billing_project.as_deref(), Some("proj"));
        assert_eq!(
            (plan.block_cache, plan.fs.prefetch_budget),
            (48 << 20, 16 << 20)
        );
        assert_eq!(plan.credentials.to_string(), "anonymous (--anonymous)");
        assert_eq!(plan.fs.uid, 7);
    }

    /// `token_file=` in fstab is `--token-file`, resolved to the token-file credentials.
    #[test]
    fn token_file_option_is_the_token_file_flag() {
        use crate::cli::{Cli, Command};
        use crate::plan::{Env, MountPlan};
        use clap::Parser;
        let Helper::Mount(argv) = translate(&v(&[
            "physiofs",
            "b",
            "/m",
            "-o",
            "ro,token_file=/run/physiofs/token,billing_project=p",
        ]))
        .unwrap() else {
            panic!("fake")
        };
        let cli = Cli::try_parse_from(std::iter::once(OsString::from("physiofs")).chain(argv));
        let Command::Mount(args) = cli.unwrap().command else {
            panic!("not a mount")
        };
        let plan = MountPlan::resolve(&args, &Env::default()).unwrap();
        assert_eq!(
            plan.credentials.to_string(),
            "access-token file /run/physiofs/token"
        );
        let e = translate(&v(&["physiofs", "b", "/m", "-o", "token_file"])).unwrap_err();
        assert!(e.contains("token_file"), "{e}");
    }

    /// Paths in fstab options and the mount point go through the CLI's own parsing: made
    /// absolute against the directory mount(8) runs the helper in, before it detaches.
    #[test]
    fn relative_paths_in_options_are_made_absolute() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let Helper::Mount(argv) = translate(&v(&[
            "physiofs",
            "b",
            "mnt",
            "-o",
            "ca_file=ca.pem,log_file=/var/log/p.log,cache_dir=cache,metadata_cache=off",
        ]))
        .unwrap() else {
            panic!("fake")
        };
        let cli = Cli::try_parse_from(std::iter::once(OsString::from("physiofs")).chain(argv));
        let Command::Mount(args) = cli.unwrap().command else {
            panic!("not a mount")
        };
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(args.mountpoint, cwd.join("mnt"));
        assert_eq!(args.ca_file, Some(cwd.join("ca.pem")));
        assert_eq!(args.cache_dir, Some(cwd.join("cache")));
        assert_eq!(args.log_file, Some("/var/log/p.log".into()));
        assert_eq!(args.metadata_cache.as_deref(), Some("off"));
    }

    #[test]
    fn bad_options_are_named() {
        let e = translate(&v(&["physiofs", "b", "/m", "-o", "ro,cache_sise=1G"])).unwrap_err();
        assert!(e.contains("cache_sise") && e.contains("cache-size"), "{e}");
        let e = translate(&v(&["physiofs", "b", "/m", "-o", "anonymous=yes"])).unwrap_err();
        assert!(e.contains("anonymous=yes"), "{e}");
        let e = translate(&v(&["physiofs", "b"])).unwrap_err();
        assert!(e.contains("SOURCE and MOUNTPOINT"), "{e}");
        let e = translate(&v(&["physiofs", "b", "/m", "-x"])).unwrap_err();
        assert!(e.contains("-x"), "{e}");
    }
}
