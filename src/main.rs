use clap::Parser;

use physiofs::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let (verbose, level) = match &cli.command {
        Command::Mount(a) => (a.verbose, a.log_level.clone()),
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
        }
    });
    if let Err(e) = result {
        eprintln!("physiofs: error: {e:#}");
        std::process::exit(1);
    }
}
