//! Benchmarks; see README "Benchmarks".
fn main() {
    eprintln!("no benchmarks yet");
}
