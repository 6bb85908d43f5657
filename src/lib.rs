//! The fapm library: the `report` feature (the rest of the API lives on the main branch).

pub mod report;
