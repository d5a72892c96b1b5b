"""Synthetic city: street views with real geometry, written in the real dataset formats.

The generator builds a procedural city (a street grid, building facades with windows,
textures and unique shop signs, plus identical trees and lamp posts everywhere), renders
street views with a vectorised 2.5D ray caster and writes them exactly like the real
Pittsburgh (``pitts30k_{split}.mat`` + ``NNN/NNNNNN_pitch1_yawY.jpg``) and Tokyo 24/7
(``tokyo247.mat`` + ``.png`` cutouts named ``.jpg`` in the .mat, day/sunset/night ``.jpg``
queries) datasets, so the project's dataset readers load it unchanged.

Geometry: every image column casts a horizontal ray (equiangular columns, horizontal field
of view 60 degrees); the nearest facade / object along the ray is drawn with a vertical
extent given by its distance (rows are ``tan(elevation)``, pitch is a vertical shift), the
sky above and the road below. Database views of one place 30 degrees apart therefore share
half of their columns, views facing away from each other share nothing.

Everything is drawn from ``numpy.random.default_rng`` seeded by the caller: the same seed
gives byte-identical images and .mat files, whatever the number of worker processes.

Modules, in pipeline order: ``city`` (the formats' constants and the city model), ``render``
(the ray caster), ``layout`` (places, queries, light), ``writers`` (dataset plan, parallel
rendering, .mat and image files: ``generate``) and ``baseline`` (raw-pixel hardness check).
"""

from .baseline import (
    chance_recall_at_1,
    raw_pixel_baseline,
    raw_pixel_descriptors,
    recall_at_n,
)
from .city import (
    CONDITIONS,
    GLYPH_COLS,
    GLYPH_ROWS,
    LAMP,
    LAMP_HEAD_R,
    LAMP_HEAD_Z,
    LAMP_POLE_R,
    LAMP_POLE_Z,
    NONTRIV_POS_DIST_SQ_THR,
    NUM_YAWS,
    PITTS_FIELDS,
    PITTS_STYLE,
    PITTS_UTM_ORIGIN,
    POS_DIST_THR,
    SPLITS,
    TOKYO_SPREAD,
    TOKYO_STYLE,
    TOKYO_UTM_ORIGIN,
    TREE,
    TREE_CROWN_R,
    TREE_CROWN_Z,
    TREE_TRUNK_R,
    TREE_TRUNK_Z,
    YAW_STEP_DEG,
    City,
    CityStyle,
    build_city,
    street_edges,
)
from .layout import (
    Place,
    sample_light,
    sample_occluders,
    sample_places,
)
from .render import (
    Camera,
    Light,
    Occluders,
    render_view,
)
from .writers import (
    PRESETS,
    RenderJob,
    SyntheticConfig,
    atomic_write_bytes,
    encode_image,
    generate,
    plan_pittsburgh,
    plan_tokyo,
    read_dbstruct,
    render_job,
    render_jobs,
    resolve_config,
    write_dbstruct,
)

__all__ = [
    'SPLITS',
    'CONDITIONS',
    'PITTS_FIELDS',
    'POS_DIST_THR',
    'NONTRIV_POS_DIST_SQ_THR',
    'NUM_YAWS',
    'YAW_STEP_DEG',
    'PITTS_UTM_ORIGIN',
    'TOKYO_UTM_ORIGIN',
    'TOKYO_SPREAD',
    'CityStyle',
    'PITTS_STYLE',
    'TOKYO_STYLE',
    'TREE',
    'LAMP',
    'TREE_TRUNK_R',
    'TREE_CROWN_R',
    'TREE_TRUNK_Z',
    'TREE_CROWN_Z',
    'LAMP_POLE_R',
    'LAMP_HEAD_R',
    'LAMP_POLE_Z',
    'LAMP_HEAD_Z',
    'GLYPH_ROWS',
    'GLYPH_COLS',
    'City',
    'street_edges',
    'build_city',
    'Camera',
    'Light',
    'Occluders',
    'render_view',
    'Place',
    'sample_places',
    'sample_occluders',
    'sample_light',
    'RenderJob',
    'SyntheticConfig',
    'PRESETS',
    'resolve_config',
    'plan_pittsburgh',
    'plan_tokyo',
    'render_job',
    'encode_image',
    'atomic_write_bytes',
    'render_jobs',
    'write_dbstruct',
    'read_dbstruct',
    'generate',
    'raw_pixel_descriptors',
    'recall_at_n',
    'chance_recall_at_1',
    'raw_pixel_baseline',
]
