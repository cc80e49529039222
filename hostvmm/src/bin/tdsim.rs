//! `tdsim`: the simulated TD. The scenarios arrive with the simulator; until then this binary
//! says so and exits.
fn main() {
    println!(
        "tdsim: the simulated TD is not yet available; run `cargo xtask test` for the test suite."
    );
}
