//! The shapes testbed world: "GenEval in miniature".
//!
//! Flat coloured shapes, one per cell of a 4×4 grid, on a plain dark background in 48×48 RGB images; prompts in GenEval's exact
//! metadata schema and wording ([`prompts`]); scenes that satisfy a prompt ([`scene_for`]); an exact
//! detector that is also tolerant of the blur, noise and off-palette pixels of generated images
//! ([`detect()`], module [`mod@detect`]); and [`score_image`], GenEval's scoring
//! ([`crate::geneval::score`]) on its detections.

pub mod captions;
pub mod detect;
pub mod parse;
pub mod prompts;
pub mod scene;
pub mod world;

pub use captions::{loosen, CaptionNoise};
pub use detect::{detect, score_image};
pub use parse::{parse_features, PARSE_DIMS};
pub use prompts::{
    all_prompts, prompt_split, random_metadata, random_metadata_of, write_prompt_files,
};
pub use scene::{scene_for, scene_in, RelationLayout};
pub use world::*;
