//! The `segmenter` binary: a thin entry point; everything lives in the library.

fn main() -> std::process::ExitCode {
    segmenter::cli::main()
}
