/// The image transform of the official PEA training scripts, on a PIL image that is already RGB:
///
///     transforms.Compose([transforms.Resize(resolution, interpolation=BILINEAR),
///                         transforms.CenterCrop(resolution), transforms.ToTensor(),
///                         transforms.Normalize([0.5], [0.5])])
///
/// reproduced step by step so the result equals torchvision's (torchvision 0.2x with Pillow ≥ 7):
/// - `Resize(r)`: the shorter side becomes r, the longer `Int(r · long / short)` (Python's `int(r * long /
///   short)`: a correctly rounded division, then truncation); an image already of that size is kept as is.
///   The resampling is Pillow's `Image.resize(size, BILINEAR)`: a separable triangle filter whose support
///   grows with the reduction factor (antialiased), horizontal pass first, both passes in 8-bit fixed point
///   with 22 fractional bits, the intermediate image rounded and clipped to 8 bits — so the result is
///   bit-exact, not merely close.
/// - `CenterCrop(r)`: top = `int(round((h − r) / 2.0))`, left likewise, with Python's `round`, which rounds
///   halves to even.
/// - `ToTensor` + `Normalize`: x/255 in float32, then (x − 0.5)/0.5 in float32, channels first.
public enum TrainingImageTransform {
    /// The whole transform: a [3, resolution, resolution] f32 tensor in [-1, 1], channels R, G, B.
    public static func tensor(from image: RGBImage, resolution: Int) -> HostTensor {
        precondition(resolution > 0, "resolution must be positive")
        let resized = resizeShorterSide(image, to: resolution)
        return normalizedTensor(centerCrop(resized, size: resolution))
    }

    /// torchvision's `Resize(size)` for a single int: shorter side to `size`, aspect ratio kept (long side
    /// truncated as torchvision computes it), Pillow's antialiased bilinear filter.
    public static func resizeShorterSide(_ image: RGBImage, to size: Int) -> RGBImage {
        let (width, height) = resizedSize(width: image.width, height: image.height, shorterSide: size)
        if width == image.width && height == image.height { return image }
        return resize(image, width: width, height: height)
    }

    /// The output size of torchvision's `Resize(shorterSide)`: (width, height).
    public static func resizedSize(width: Int, height: Int, shorterSide size: Int) -> (width: Int, height: Int) {
        let (short, long) = width <= height ? (width, height) : (height, width)
        // Python: int(size * long / short) — the exact integer product, one correctly rounded division.
        let newLong = Int(Double(size * long) / Double(short))
        return width <= height ? (size, newLong) : (newLong, size)
    }

    /// Pillow's `Image.resize((width, height), Image.BILINEAR)` of an RGB image (reducing_gap None).
    public static func resize(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        precondition(width > 0 && height > 0, "resize to \(width)×\(height)")
        if width == image.width && height == image.height { return image }
        let vertical = FilterWeights(inSize: image.height, outSize: height)
        var source = image.pixels
        var sourceWidth = image.width
        var verticalBounds = vertical.bounds
        if width != image.width {
            // Only the rows the vertical pass will read are resampled horizontally (as Pillow does).
            let first = vertical.bounds[0], last = vertical.bounds[2 * (height - 1)] + vertical.bounds[2 * height - 1]
            let horizontal = FilterWeights(inSize: image.width, outSize: width)
            source = horizontalPass(image.pixels, inWidth: image.width, rows: first..<last, weights: horizontal)
            sourceWidth = width
            for index in 0..<height { verticalBounds[2 * index] -= first }
            // Same height: Pillow skips the vertical pass (those bounds cover every row, in order).
            if height == image.height { return RGBImage(width: width, height: height, pixels: source) }
        }
        let output = verticalPass(source, width: sourceWidth, outHeight: height, bounds: verticalBounds,
                                  coefficients: vertical.coefficients, taps: vertical.taps)
        return RGBImage(width: sourceWidth, height: height, pixels: output)
    }

    /// torchvision's `CenterCrop(size)` for an image at least `size` in both directions.
    public static func centerCrop(_ image: RGBImage, size: Int) -> RGBImage {
        precondition(image.width >= size && image.height >= size,
                     "center crop of \(size) from a \(image.width)×\(image.height) image")
        return crop(image, top: cropOffset(image.height, size), left: cropOffset(image.width, size), width: size, height: size)
    }

    /// `int(round((length - size) / 2.0))` with Python's round-half-to-even.
    static func cropOffset(_ length: Int, _ size: Int) -> Int {
        Int((Double(length - size) / 2.0).rounded(.toNearestOrEven))
    }

    /// `Normalize([0.5], [0.5])(ToTensor()(image))`: [3, height, width] f32, each value (x/255 − 0.5)/0.5
    /// computed in float32 as torch does.
    public static func normalizedTensor(_ image: RGBImage) -> HostTensor {
        let plane = image.width * image.height
        var values = [Float](repeating: 0, count: 3 * plane)
        var table = [Float](repeating: 0, count: 256)
        for value in 0..<256 { table[value] = (Float(value) / 255 - 0.5) / 0.5 }
        image.pixels.withUnsafeBufferPointer { source in
            values.withUnsafeMutableBufferPointer { out in
                for index in 0..<plane {
                    out[index] = table[Int(source[3 * index])]
                    out[plane + index] = table[Int(source[3 * index + 1])]
                    out[2 * plane + index] = table[Int(source[3 * index + 2])]
                }
            }
        }
        return HostTensor(values, shape: [3, image.height, image.width])
    }

    // MARK: - Pillow's resampling (libImaging/Resample.c semantics)

    /// The fixed-point weights of one direction: for each output position the first input index, the number
    /// of inputs, and `taps` coefficients (Q22).
    struct FilterWeights {
        static let precisionBits = 22
        let taps: Int
        /// [first, count] per output position.
        var bounds: [Int]
        var coefficients: [Int32]

        /// The triangle (bilinear) filter of support 1, widened by the scale factor when reducing, evaluated
        /// at the centres of the output pixels; each row normalised to sum 1, then rounded to Q22 (away from
        /// zero at halves).
        init(inSize: Int, outSize: Int) {
            let scale = Double(inSize) / Double(outSize)
            let filterScale = max(scale, 1.0)
            let support = 1.0 * filterScale
            taps = Int(support.rounded(.up)) * 2 + 1
            bounds = [Int](repeating: 0, count: 2 * outSize)
            coefficients = [Int32](repeating: 0, count: outSize * taps)
            var weights = [Double](repeating: 0, count: taps)
            let inverseScale = 1.0 / filterScale
            for position in 0..<outSize {
                let center = (Double(position) + 0.5) * scale
                // C's (int) conversion truncates toward zero
                let first = max(Int((center - support + 0.5).rounded(.towardZero)), 0)
                let end = min(Int((center + support + 0.5).rounded(.towardZero)), inSize)
                let count = end - first
                var total = 0.0
                for tap in 0..<count {
                    var x = (Double(tap + first) - center + 0.5) * inverseScale
                    if x < 0 { x = -x }
                    let weight = x < 1.0 ? 1.0 - x : 0.0
                    weights[tap] = weight
                    total += weight
                }
                for tap in 0..<taps {
                    var weight = tap < count ? weights[tap] : 0
                    if tap < count && total != 0 { weight /= total }
                    let scaled = weight * Double(1 << FilterWeights.precisionBits)
                    coefficients[position * taps + tap] = Int32(weight < 0 ? (scaled - 0.5).rounded(.towardZero)
                                                                           : (scaled + 0.5).rounded(.towardZero))
                }
                bounds[2 * position] = first
                bounds[2 * position + 1] = count
            }
        }
    }

    /// An accumulated Q22 value to 8 bits: shifted (rounding was added up front), clipped to 0…255.
    @inline(__always)
    private static func clip8(_ value: Int32) -> UInt8 {
        let shifted = value >> Int32(FilterWeights.precisionBits)
        return shifted < 0 ? 0 : shifted > 255 ? 255 : UInt8(shifted)
    }

    private static func horizontalPass(_ pixels: [UInt8], inWidth: Int, rows: Range<Int>,
                                       weights: FilterWeights) -> [UInt8] {
        let outWidth = weights.bounds.count / 2
        var output = [UInt8](repeating: 0, count: rows.count * outWidth * 3)
        let half = Int32(1) << Int32(FilterWeights.precisionBits - 1)
        pixels.withUnsafeBufferPointer { source in
            weights.coefficients.withUnsafeBufferPointer { k in
                output.withUnsafeMutableBufferPointer { out in
                    for (outRow, row) in rows.enumerated() {
                        let rowStart = row * inWidth * 3
                        for x in 0..<outWidth {
                            let first = weights.bounds[2 * x], count = weights.bounds[2 * x + 1]
                            var r = half, g = half, b = half
                            for tap in 0..<count {
                                let weight = k[x * weights.taps + tap]
                                let at = rowStart + (first + tap) * 3
                                r &+= Int32(source[at]) &* weight
                                g &+= Int32(source[at + 1]) &* weight
                                b &+= Int32(source[at + 2]) &* weight
                            }
                            let to = (outRow * outWidth + x) * 3
                            out[to] = clip8(r); out[to + 1] = clip8(g); out[to + 2] = clip8(b)
                        }
                    }
                }
            }
        }
        return output
    }

    private static func verticalPass(_ pixels: [UInt8], width: Int, outHeight: Int, bounds: [Int],
                                     coefficients: [Int32], taps: Int) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: outHeight * width * 3)
        let half = Int32(1) << Int32(FilterWeights.precisionBits - 1)
        let rowBytes = width * 3
        pixels.withUnsafeBufferPointer { source in
            coefficients.withUnsafeBufferPointer { k in
                output.withUnsafeMutableBufferPointer { out in
                    for y in 0..<outHeight {
                        let first = bounds[2 * y], count = bounds[2 * y + 1]
                        for index in 0..<rowBytes {
                            var sum = half
                            for tap in 0..<count {
                                sum &+= Int32(source[(first + tap) * rowBytes + index]) &* k[y * taps + tap]
                            }
                            out[y * rowBytes + index] = clip8(sum)
                        }
                    }
                }
            }
        }
        return output
    }
}
