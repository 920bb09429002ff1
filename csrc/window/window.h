// Index math of shifted-window attention, shared by every engine. Torch-free, so CUDA kernels include it.
//
// Swin's sequence of copies (roll the H x W grid by -shift, pad bottom/right to Hp x Wp, cut windows of
// wh x ww, attend, reverse) becomes arithmetic on token indices: window w (row-major over the Hp/wh x
// Wp/ww windows) at position p (row-major inside the window) is the cell (y', x') of the shifted, padded
// grid, which holds token ((y' + sh) mod H) * W + (x' + sw) mod W, or a pad token when y' >= H or x' >= W.
#pragma once
#include "common/pk_common.h"

namespace pk::window {

// Added between tokens of different shift regions, exactly as Swin's attention mask does (not -inf).
constexpr double kShiftMaskValue = -100.0;

struct Geometry {
  index_t height, width;      // the token grid H x W
  index_t win_h, win_w;       // window wh x ww
  index_t shift_h, shift_w;   // the grid is rolled by -shift before partitioning
  index_t padded_h, padded_w; // Hp, Wp: whole windows
  index_t windows_w;          // windows per row of the padded grid

  PK_HOST_DEVICE index_t windows() const { return padded_h / win_h * windows_w; }
  PK_HOST_DEVICE index_t positions() const { return win_h * win_w; }
};

PK_HOST_DEVICE Geometry make_geometry(index_t height, index_t width, index_t win_h, index_t win_w, index_t shift_h,
                                      index_t shift_w) {
  const index_t padded_h = (height + win_h - 1) / win_h * win_h, padded_w = (width + win_w - 1) / win_w * win_w;
  return {height, width, win_h, win_w, shift_h, shift_w, padded_h, padded_w, padded_w / win_w};
}

// The cell (y', x') of the shifted, padded grid at position pos of window w.
PK_HOST_DEVICE void window_cell(const Geometry& g, index_t w, index_t pos, index_t* y, index_t* x) {
  *y = w / g.windows_w * g.win_h + pos / g.win_w;
  *x = w % g.windows_w * g.win_w + pos % g.win_w;
}

// The token at position pos of window w, or -1 for a pad token.
PK_HOST_DEVICE index_t token_at(const Geometry& g, index_t w, index_t pos) {
  index_t y, x;
  window_cell(g, w, pos, &y, &x);
  if (y >= g.height || x >= g.width) return -1;
  return (y + g.shift_h) % g.height * g.width + (x + g.shift_w) % g.width;
}

// Where a token lands: its window and its position in that window.
PK_HOST_DEVICE void locate(const Geometry& g, index_t token, index_t* w, index_t* pos) {
  const index_t y = ((token / g.width - g.shift_h) % g.height + g.height) % g.height;
  const index_t x = ((token % g.width - g.shift_w) % g.width + g.width) % g.width;
  *w = y / g.win_h * g.windows_w + x / g.win_w;
  *pos = y % g.win_h * g.win_w + x % g.win_w;
}

// Swin's regions along one padded axis of length p: [0, p - win), [p - win, p - shift), [p - shift, p).
// Without a shift timm's slices leave the whole axis one region.
PK_HOST_DEVICE index_t axis_region(index_t c, index_t padded, index_t win, index_t shift) {
  if (shift == 0) return 0;
  return c < padded - win ? 0 : (c < padded - shift ? 1 : 2);
}

// The shift-mask region of position pos of window w; tokens of different regions see each other at -100.
PK_HOST_DEVICE index_t region(const Geometry& g, index_t w, index_t pos) {
  index_t y, x;
  window_cell(g, w, pos, &y, &x);
  return axis_region(y, g.padded_h, g.win_h, g.shift_h) * 3 + axis_region(x, g.padded_w, g.win_w, g.shift_w);
}

// Every window but those of the last window row and column lies inside region 0.
PK_HOST_DEVICE bool single_region(const Geometry& g, index_t w) {
  const bool last_row = w / g.windows_w == g.padded_h / g.win_h - 1, last_col = w % g.windows_w == g.windows_w - 1;
  return (g.shift_h == 0 || !last_row) && (g.shift_w == 0 || !last_col);
}

// Rows of Swin's relative-position table [(2 wh - 1)(2 ww - 1), heads]: the query at position i and the key
// at position j read row rel_center + rel_offset(i) - rel_offset(j), which is timm's relative_position_index.
PK_HOST_DEVICE index_t table_rows(const Geometry& g) { return (2 * g.win_h - 1) * (2 * g.win_w - 1); }
PK_HOST_DEVICE index_t rel_offset(const Geometry& g, index_t pos) {
  return pos / g.win_w * (2 * g.win_w - 1) + pos % g.win_w;
}
PK_HOST_DEVICE index_t rel_center(const Geometry& g) { return (g.win_h - 1) * (2 * g.win_w - 1) + g.win_w - 1; }
PK_HOST_DEVICE index_t rel_index(const Geometry& g, index_t i, index_t j) {
  return rel_center(g) + rel_offset(g, i) - rel_offset(g, j);
}

}  // namespace pk::window
