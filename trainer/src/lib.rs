//! cohort trainer.
pub use tch;
