(function () {
  "use strict";
  // The subscribe form's proof of work: before the form goes, find a nonce (8 hex
  // digits) such that SHA-256(seed || nonce) starts with `bits` zero bits, where seed =
  // SHA-256(challenge + "\n" + address). The server checks it with one hash; finding it
  // takes ~2^bits hashes, which is what sending the form costs a script.
  var form = document.getElementById("subscribe-form");
  if (!form || !form.dataset.challenge) return;
  var bits = parseInt(form.dataset.bits, 10) || 0;
  var K = new Int32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
  ]);
  var IV = new Int32Array([
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  ]);

  function compress(H, W) {
    var i, x, y;
    for (i = 16; i < 64; i++) {
      x = W[i - 15];
      y = W[i - 2];
      W[i] = (W[i - 16] + (((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3)) +
        W[i - 7] + (((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10))) | 0;
    }
    var a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (i = 0; i < 64; i++) {
      var t1 = (h + (((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7))) +
        ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      var t2 = ((((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10))) +
        ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }

  // SHA-256 of any bytes, as 8 big-endian words.
  function sha256(bytes) {
    var length = bytes.length;
    var total = Math.ceil((length + 9) / 64) * 64;
    var padded = new Uint8Array(total);
    padded.set(bytes);
    padded[length] = 0x80;
    var bitLength = length * 8;
    padded[total - 5] = (bitLength / 0x100000000) & 0xff;
    padded[total - 4] = (bitLength >>> 24) & 0xff;
    padded[total - 3] = (bitLength >>> 16) & 0xff;
    padded[total - 2] = (bitLength >>> 8) & 0xff;
    padded[total - 1] = bitLength & 0xff;
    var H = new Int32Array(IV), W = new Int32Array(64);
    for (var offset = 0; offset < total; offset += 64) {
      for (var i = 0; i < 16; i++) {
        var j = offset + i * 4;
        W[i] = (padded[j] << 24) | (padded[j + 1] << 16) | (padded[j + 2] << 8) | padded[j + 3];
      }
      compress(H, W);
    }
    return H;
  }

  // A 16-bit value -> its 4 lower-case hex digits as one big-endian word of ASCII codes.
  var HEX = new Int32Array(65536);
  for (var v = 0; v < 65536; v++) {
    var word = 0;
    for (var shift = 12; shift >= 0; shift -= 4) {
      var nibble = (v >>> shift) & 15;
      word = (word << 8) | (nibble < 10 ? 48 + nibble : 87 + nibble);
    }
    HEX[v] = word;
  }

  function hex8(n) {
    return ("0000000" + (n >>> 0).toString(16)).slice(-8);
  }

  // The message is seed (32 bytes) + nonce (8 ASCII bytes): one padded 64-byte block.
  function solver(seed) {
    var W = new Int32Array(64), H = new Int32Array(8);
    for (var i = 0; i < 8; i++) W[i] = seed[i];
    W[10] = 0x80000000 | 0;
    W[15] = 320;
    var shift = 32 - bits;
    return function (start, end) {
      for (var n = start; n < end; n++) {
        W[8] = HEX[n >>> 16];
        W[9] = HEX[n & 0xffff];
        H.set(IV);
        compress(H, W);
        if (H[0] >>> shift === 0) return n;
      }
      return -1;
    };
  }

  var button = form.querySelector("button[type=submit]");
  var status = document.getElementById("subscribe-status");
  var nonce = form.elements.namedItem("nonce");

  function reset() {
    form.dataset.solved = "";
    if (button) button.disabled = false;
    if (status) status.textContent = "";
  }
  // Back to the page from the browser's cache after sending it: usable again.
  window.addEventListener("pageshow", reset);

  form.addEventListener("submit", function (event) {
    if (form.dataset.solved === "1" || bits <= 0) return;
    event.preventDefault();
    if (button) button.disabled = true;
    if (status) status.textContent = form.dataset.working || "";
    var address = form.elements.namedItem("address").value.trim();
    var seed = sha256(new TextEncoder().encode(form.dataset.challenge + "\n" + address));
    var solve = solver(seed);
    var next = 0;
    function step() {
      // Slices of work, so the page stays responsive (and the message is shown).
      var found = solve(next, next + 50000);
      next += 50000;
      if (found >= 0) {
        nonce.value = hex8(found);
        form.dataset.solved = "1";
        form.submit();
      } else if (next < 0x100000000) {
        setTimeout(step, 0);
      } else {
        reset();
      }
    }
    setTimeout(step, 20);
  });
})();
