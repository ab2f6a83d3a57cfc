use clap::Parser;

use physiofs::cli::{Cli, Command};
use physiofs::helper::Helper;

fn main() {
    // glibc gives each thread its own malloc arena, and by default mmaps big blocks afresh
    // (each page then faults, is zeroed and charged on first touch) and trims freed heap
    // memory eagerly. Receive buffers (up to 4 MiB, one per request) are short-lived now that
    // blocks the kernel's page cache holds leave the cache, so reusing heap memory for them is
    // far cheaper: two arenas, buffers up to 8 MiB from the heap, and up to 32 MiB of free
    // heap kept rather than trimmed and faulted back in. RSS stays within the cache budget
    // plus that slack (tests/mount_memory.rs).
    // SAFETY: mallopt only tunes the allocator, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
    // `physiofs SOURCE MOUNTPOINT -o OPTS` (mount(8), /etc/fstab) becomes `physiofs mount ...`.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cli = if physiofs::helper::is_mount_form(&argv) {
        match physiofs::helper::translate(&argv) {
            Ok(Helper::Mount(args)) => {
                Cli::parse_from(std::iter::once("physiofs".into()).chain(args))
            }
            Ok(Helper::Fake) => std::process::exit(0),
            Err(e) => fail(&anyhow::anyhow!(e)),
        }
    } else {
        Cli::parse()
    };
    // `mount --background` forks here, before any thread exists; the parent exits in there
    // once the child reports the mount ready or failed.
    let mut notify = None;
    let mut log_file = None;
    if let Command::Mount(a) = &mut cli.command {
        if a.background {
            match physiofs::daemon::detach(a) {
                Ok(n) => notify = Some(n),
                Err(e) => fail(&e),
            }
        } else if let Some(path) = &a.log_file {
            match physiofs::daemon::open_log(path) {
                Ok(f) => log_file = Some(f),
                Err(e) => fail(&e),
            }
        }
    }
    let (verbose, level) = match &cli.command {
        Command::Mount(a) => (a.verbose, a.log_level.clone()),
        Command::Demo(a) => (a.verbose, None),
        Command::Testbed(_) => (0, None),
        Command::Doctor(a) => (a.mount.verbose, a.mount.log_level.clone()),
        Command::Warm(a) => (a.verbose, None),
        Command::Cache(_) => (0, None),
    };
    physiofs::logging::init(verbose, level.as_deref(), log_file);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("physiofs-io")
        .build()
        .expect("cannot start the tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Mount(a) => physiofs::mount::run(a, notify.as_ref()).await,
            Command::Demo(a) => physiofs::demo::run(a).await,
            Command::Doctor(a) => physiofs::doctor::run(a).await,
            Command::Warm(a) => physiofs::warm::run(a).await,
            Command::Cache(a) => physiofs::warm::cache_command(a).await,
            Command::Testbed(a) => {
                let source: std::sync::Arc<dyn physiofs::testbed::ObjectSource> =
                    match physiofs::testbed::dir_source(&a)? {
                        Some(s) => s,
                        None => physiofs::testbed::ModelSource::from_args(&a)?,
                    };
                physiofs::testbed::run(a, source).await
            }
        }
    });
    if let Err(e) = result {
        if let Some(n) = &notify {
            n.failed(&format!("{e:#}"));
        }
        fail(&e);
    }
}

fn fail(e: &anyhow::Error) -> ! {
    eprintln!("physiofs: error: {e:#}");
    std::process::exit(1);
}
