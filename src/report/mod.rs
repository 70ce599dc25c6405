//! What a run leaves for people to look at: TensorBoard event files written as it trains
//! (`tensorboard.rs`), and `kiln report`'s self-contained HTML page of one or more runs
//! (`html.rs`).

pub mod html;
pub mod tensorboard;
