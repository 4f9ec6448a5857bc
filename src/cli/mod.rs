//! The subcommands that read models back from disk: `dgpo eval`, `dgpo sample`, `dgpo export`, and
//! the resolver of their `--checkpoint` values ([`source`]). The argument parser itself is `src/main.rs`.

pub mod eval;
pub mod export;
pub mod sample;
pub mod source;
