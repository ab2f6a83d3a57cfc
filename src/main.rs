use clap::Parser;

use physiofs::cli::{Cli, Command};

fn main() {
    // glibc gives each thread its own malloc arena, and raises its mmap threshold after the
    // first large free, after which multi-MiB block buffers come from the heap and linger as
    // RSS once freed. Two arenas and a fixed 1 MiB threshold keep RSS close to what the cache
    // holds: MiB-sized receive buffers are mmapped and returned on free, while the HTTP
    // stack's read buffers (up to ~400 KiB) are reused from the heap instead of being mapped,
    // faulted in and zeroed again for every few hundred KiB received.
    // SAFETY: mallopt only tunes the allocator, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let cli = Cli::parse();
    let (verbose, level) = match &cli.command {
        Command::Mount(a) => (a.verbose, a.log_level.clone()),
        Command::Demo(a) => (a.verbose, None),
        Command::Testbed(_) => (0, None),
    };
    physiofs::logging::init(verbose, level.as_deref());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("physiofs-io")
        .build()
        .expect("cannot start the tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Mount(a) => physiofs::mount::run(a).await,
            Command::Demo(a) => physiofs::demo::run(a).await,
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
        eprintln!("physiofs: error: {e:#}");
        std::process::exit(1);
    }
}
